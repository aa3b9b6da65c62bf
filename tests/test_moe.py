"""Tests for dsv3_min.moe: routing and output parity with transformers' DeepseekV3MoE, grouped == loop (forward and
gradients), aux-loss-free bias update, sequence-wise balance loss, MaxVio, config validation."""
import inspect

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter

from conftest import tiny_config
from dsv3_min.moe import Experts, MoE, Router, expert_counts, max_vio, sequence_balance_loss

# transformers >= ~5.20 masks non-selected groups with -inf (as we do); older releases (5.17 on the GPU box) with 0.0.
# The two rules agree whenever every biased score is positive, so for a 0.0-masking version we keep the bias >= 0.
HF_MASKS_WITH_INF = 'float("-inf")' in inspect.getsource(DeepseekV3TopkRouter.forward)


def _hf_moe(cfg, seed=0):
    """transformers' DeepseekV3MoE for `cfg` with random weights and a random (non-zero) correction bias."""
    torch.manual_seed(seed)
    ref = DeepseekV3MoE(DeepseekV3Config(**cfg.to_hf(), experts_implementation="eager"))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        bias = torch.randn(cfg.n_routed_experts) * 0.1
        ref.gate.e_score_correction_bias.copy_(bias if HF_MASKS_WITH_INF else bias.abs())
    return ref


@pytest.mark.parametrize("n_group,topk_group,k", [(1, 1, 2), (4, 2, 3), (4, 1, 2)])
def test_router_matches_transformers(n_group, topk_group, k):
    """Our Router selects the same experts with the same weights as DeepseekV3TopkRouter (group-limited, biased),
    whichever way the installed transformers masks dropped groups."""
    cfg = tiny_config(n_routed_experts=16, n_group=n_group, topk_group=topk_group, num_experts_per_tok=k)
    ref = _hf_moe(cfg)
    ours = MoE(cfg)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(64, cfg.hidden_size)
    _, hf_w, hf_idx = ref.gate(x)
    w, idx, scores = ours.gate(x)
    o_ref, o = hf_idx.argsort(-1), idx.argsort(-1)
    assert torch.equal(idx.gather(1, o), hf_idx.gather(1, o_ref))
    torch.testing.assert_close(w.gather(1, o), hf_w.gather(1, o_ref), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(scores, torch.sigmoid(x @ ref.gate.weight.T))


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_moe_matches_transformers(impl, n_group, topk_group):
    """MoE (routed + shared) equals DeepseekV3MoE after loading its state dict, fp32, to 1e-5, for both impls."""
    cfg = tiny_config(n_routed_experts=16, n_group=n_group, topk_group=topk_group, num_experts_per_tok=4,
                      moe_impl=impl)
    ref = _hf_moe(cfg, seed=1)
    ours = MoE(cfg).eval()
    missing = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 17, cfg.hidden_size)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def _assert_grouped_equals_loop(ex, x, w0, idx):
    "The grouped and the loop implementation of `ex` agree on the output and the gradients of x, w and both stacks."
    res = {}
    for impl in ("loop", "grouped"):
        xi, wi = x.clone().requires_grad_(), w0.clone().requires_grad_()
        ex.zero_grad()
        out = ex(xi, wi, idx, impl=impl)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        res[impl] = (out, xi.grad, wi.grad, ex.gate_up_proj.grad.clone(), ex.down_proj.grad.clone())
    for a, b in zip(res["grouped"], res["loop"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 40), E=st.sampled_from([2, 4, 8]), k=st.integers(1, 2), seed=st.integers(0, 10_000))
def test_grouped_equals_loop_forward_and_grad(T, E, k, seed):
    """The loop-free grouped path and the per-expert loop give the same output and the same gradients for x, both
    expert weight stacks and the gating weights, for random sizes (including experts that get no token)."""
    torch.manual_seed(seed)
    cfg = tiny_config(n_routed_experts=E, num_experts_per_tok=k, n_group=1, topk_group=1)
    ex = Experts(cfg)
    x = torch.randn(T, cfg.hidden_size)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w0 = torch.rand(T, k)
    _assert_grouped_equals_loop(ex, x, w0, idx)


@pytest.mark.parametrize("T", [1, 3, 4, 5])
def test_few_rows_gather_their_matrices_equal_to_loop_and_compile_without_a_break(T):
    """With no more (token, expert) rows than experts (T·k ≤ E = 8: a decode step), the grouped path gathers each
    row's expert matrix: same output and gradients as the per-expert loop, and dynamo traces it with no graph break
    (the padded path reads its block size with a host sync, which breaks the graph; T=5 gives 10 rows and takes it)."""
    torch.manual_seed(T)
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    ex = Experts(cfg)
    x, idx, w0 = torch.randn(T, cfg.hidden_size), torch.stack([torch.randperm(8)[:2] for _ in range(T)]), torch.rand(T, 2)
    _assert_grouped_equals_loop(ex, x, w0, idx)
    with torch.no_grad():
        breaks = torch._dynamo.explain(ex)(x, w0, idx).graph_break_count
    torch._dynamo.reset()
    assert (breaks == 0) == (T * 2 <= 8), breaks


def test_grouped_equals_loop_bf16():
    """In bf16 the grouped path (CPU: padded bmm) and the loop agree to bf16 rounding."""
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    ex = Experts(cfg).to(torch.bfloat16)
    x = torch.randn(30, cfg.hidden_size, dtype=torch.bfloat16)
    w, idx, _ = Router(cfg)(x)
    torch.testing.assert_close(ex(x, w, idx, impl="grouped"), ex(x, w, idx, impl="loop"), atol=2e-2, rtol=2e-2)


def test_group_limit_respected():
    """With n_group>1 every token's experts lie in at most topk_group groups, even when the bias favours others."""
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    r = Router(cfg)
    with torch.no_grad():
        r.weight.normal_(0, 1.0)
        r.e_score_correction_bias.normal_(0, 0.5)
    _, idx, _ = r(torch.randn(200, cfg.hidden_size))
    groups = idx // 4
    assert max(len(set(g)) for g in groups.tolist()) <= 2
    assert all(len(set(row)) == 4 for row in idx.tolist())  # k distinct experts


def test_bias_affects_selection_not_weights():
    """A large bias on expert 0 makes every token select it, but its weight comes from the unbiased affinity."""
    cfg = tiny_config(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=1.0)
    r = Router(cfg)
    x = torch.randn(50, cfg.hidden_size)
    with torch.no_grad():
        r.e_score_correction_bias[0] = 10.0
    w, idx, scores = r(x)
    assert torch.all((idx == 0).any(-1))
    chosen = scores.gather(1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))


def test_router_stays_fp32():
    """`MoE.to(bfloat16)` converts the experts but keeps the router weight and bias in fp32, values unchanged."""
    m = MoE(tiny_config())
    w = m.gate.weight.detach().clone()
    m.to(torch.bfloat16)
    assert m.experts.gate_up_proj.dtype == torch.bfloat16
    assert m.gate.weight.dtype == torch.float32 and m.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(m.gate.weight, w)
    y = m(torch.randn(2, 5, m.cfg.hidden_size, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_load_counted_in_training_only_and_reset():
    """Training forwards accumulate T*k assignments into `load`; eval forwards do not; update_bias resets it."""
    cfg = tiny_config()
    m = MoE(cfg).train()
    x = torch.randn(2, 7, cfg.hidden_size)
    m(x)
    m(x)
    assert m.load.sum().item() == 2 * 14 * cfg.num_experts_per_tok
    m.eval()
    m(x)
    assert m.load.sum().item() == 2 * 14 * cfg.num_experts_per_tok
    m.update_bias(0.0)
    assert m.load.sum().item() == 0 and m.last_load.sum().item() == 28 * cfg.num_experts_per_tok


def test_update_bias_rule():
    """update_bias adds gamma*sign(mean-load) minus its mean; gamma=0 leaves the bias unchanged."""
    m = MoE(tiny_config(n_routed_experts=4, n_group=1, topk_group=1))
    m.load.copy_(torch.tensor([10, 2, 4, 4]))  # mean 5: over, under, under, under
    m.update_bias(0.1)
    delta = torch.tensor([-0.1, 0.1, 0.1, 0.1])
    torch.testing.assert_close(m.gate.e_score_correction_bias, delta - delta.mean())
    before = m.gate.e_score_correction_bias.clone()
    m.load.copy_(torch.tensor([10, 2, 4, 4]))
    m.update_bias(0.0)
    torch.testing.assert_close(m.gate.e_score_correction_bias, before)


def _imbalanced(cfg, seed=0):
    """A MoE whose router strongly prefers experts 0 and 1 for inputs around `mu`."""
    torch.manual_seed(seed)
    moe = MoE(cfg).train()
    mu = torch.randn(cfg.hidden_size)
    mu = 2.0 * mu / mu.norm()
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)
        moe.gate.weight[:2] += 2.0 * mu
    return moe, mu


@pytest.fixture
def one_thread():
    """Run a loop of tiny ops on one thread (faster than two, and robust to a busy CPU); restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("gamma", [0.0, 1e-2])
def test_bias_update_moves_load_toward_balance(gamma, one_thread):
    """From a deliberately imbalanced router, bias updates alone (no gradient step) bring MaxVio from > 2 to < 0.8
    (mean of the last 50 of 150 steps); with gamma = 0 it stays > 2."""
    cfg = tiny_config(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, aux_loss_alpha=0.0)
    moe, mu = _imbalanced(cfg)
    g = torch.Generator().manual_seed(1)
    vios = []
    for _ in range(150):
        with torch.no_grad():
            moe(mu + torch.randn(4, 64, cfg.hidden_size, generator=g))
        vios.append(moe.max_vio())
        moe.update_bias(gamma)
    assert vios[0] > 2.0
    late = sum(vios[-50:]) / 50
    assert (late < 0.8) if gamma > 0 else (late > 2.0)


def test_sequence_balance_loss_formula():
    """sequence_balance_loss equals the report's alpha-free sum_i f_i P_i computed with explicit loops, per sequence,
    averaged; it is 1 for perfectly uniform routing and affinities."""
    b, T, E, k = 3, 5, 6, 2
    scores = torch.rand(b * T, E)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(b * T)])
    got = sequence_balance_loss(scores, idx, b, k)
    total = 0.0
    for s in range(b):
        sc, ix = scores[s * T:(s + 1) * T], idx[s * T:(s + 1) * T]
        for i in range(E):
            f = E / (k * T) * sum(int(i in ix[t].tolist()) for t in range(T))
            p = sum((sc[t, i] / sc[t].sum()).item() for t in range(T)) / T
            total += f * p
    assert got.item() == pytest.approx(total / b, rel=1e-5)
    uni_idx = torch.tensor([[0, 1], [2, 3], [4, 5]])
    assert sequence_balance_loss(torch.ones(3, E), uni_idx, 1, k).item() == pytest.approx(1.0)


def test_aux_loss_exposed_and_differentiable():
    """After a training forward aux_loss = alpha * balance loss, with a gradient on the router weight; 0 in eval and
    when alpha = 0."""
    cfg = tiny_config(aux_loss_alpha=0.01)
    m = MoE(cfg).train()
    x = torch.randn(2, 9, cfg.hidden_size)
    m(x)
    w, idx, scores = m.gate(rearrange(x, "b s d -> (b s) d"))
    torch.testing.assert_close(m.aux_loss, 0.01 * sequence_balance_loss(scores, idx, 2, cfg.num_experts_per_tok))
    m.aux_loss.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    m.eval()
    m(x)
    assert m.aux_loss.item() == 0.0
    m0 = MoE(tiny_config(aux_loss_alpha=0.0)).train()
    m0(x)
    assert m0.aux_loss.item() == 0.0


def test_max_vio_and_counts():
    """MaxVio = (max - mean)/mean; 0 for balanced or empty load; expert_counts counts every assignment."""
    assert max_vio(torch.tensor([4, 4, 4, 4])) == 0.0
    assert max_vio(torch.tensor([8, 0, 4, 4])) == pytest.approx(1.0)
    assert max_vio(torch.zeros(4)) == 0.0
    assert expert_counts(torch.tensor([[0, 1], [1, 3]]), 4).tolist() == [1, 2, 0, 1]


@pytest.mark.parametrize("kw,field", [
    (dict(n_routed_experts=8, num_experts_per_tok=9, n_group=1, topk_group=1), "num_experts_per_tok"),
    (dict(n_routed_experts=8, n_group=2, topk_group=3), "topk_group"),
    (dict(n_routed_experts=10, n_group=4, topk_group=1), "n_group"),
])
def test_bad_moe_config_raises(kw, field):
    """Impossible MoE configs (k > experts, topk_group > n_group, experts not divisible by groups) raise ValueError
    naming the field."""
    with pytest.raises(ValueError, match=field):
        tiny_config(**kw)


def test_bad_shapes_raise():
    """Wrong input shapes raise ValueError stating what was expected (an unknown moe_impl is ModelConfig's error)."""
    cfg = tiny_config()
    m = MoE(cfg)
    with pytest.raises(ValueError, match=r"expected x of shape \(b, s, 64\)"):
        m(torch.randn(3, 64))
    with pytest.raises(ValueError, match=r"expected x of shape \(T, 64\)"):
        m.gate(torch.randn(3, 63))


CUDA_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(not CUDA_SM90, reason="needs a CUDA GPU with sm90+ (torch._grouped_mm path)")
def test_grouped_mm_cuda_matches_loop_without_host_sync():
    """On a Hopper GPU in bf16 the grouped path really uses torch._grouped_mm, agrees with the per-expert loop
    (forward and gradients, to bf16 rounding), and its training forward makes no host synchronization."""
    from dsv3_min import moe as moe_mod

    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
                      n_group=4, topk_group=2, aux_loss_alpha=1e-3)
    m = MoE(cfg).cuda().to(torch.bfloat16).train()
    with torch.no_grad():
        m.gate.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(4, 100, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    assert moe_mod._grouped_mm_ok(x.view(-1, cfg.hidden_size), m.experts.gate_up_proj, torch.bfloat16)
    res = {}
    for impl in ("loop", "grouped"):
        m.impl = impl
        m.zero_grad()
        xi = x.clone().requires_grad_()
        if impl == "grouped":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            y = m(xi)
            loss = y.float().pow(2).mean() + m.aux_loss
        finally:
            torch.cuda.set_sync_debug_mode(0)
        loss.backward()
        res[impl] = (y.float(), xi.grad.float(), m.experts.gate_up_proj.grad.float(), m.experts.down_proj.grad.float(),
                     m.gate.weight.grad.float())
    for a, b in zip(res["grouped"], res["loop"]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not CUDA_SM90, reason="needs a CUDA GPU with sm90+ (torch._grouped_mm path)")
def test_grouped_mm_under_autocast_with_fp32_weights():
    """Training keeps fp32 master weights under bf16 autocast: the grouped path must still take torch._grouped_mm
    (autocast does not cover it), with no host sync, and agree with the loop path run under the same autocast."""
    from dsv3_min import moe as moe_mod

    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
                      n_group=1, topk_group=1)
    m = MoE(cfg).cuda().train()
    x = torch.randn(4, 64, cfg.hidden_size, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert moe_mod._matmul_dtype(x) == torch.bfloat16
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = m(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        m.impl = "loop"
        ref = m(x)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_matmul_dtype_follows_the_tensor_on_cpu():
    """Off CUDA autocast the grouped matmul runs in the input's own dtype."""
    from dsv3_min import moe as moe_mod

    assert moe_mod._matmul_dtype(torch.zeros(2, 2)) == torch.float32
    assert moe_mod._matmul_dtype(torch.zeros(2, 2, dtype=torch.bfloat16)) == torch.bfloat16


@settings(max_examples=25, deadline=None)
@given(n_src=st.integers(1, 12), fanout=st.integers(1, 4), d=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_gather_rows_equals_indexing_forward_and_backward(n_src, fanout, d, seed):
    """`gather_rows` (whose backward is a gather by the inverse permutation, no scatter) gives exactly the forward
    and the gradient of plain indexing `src[index // fanout]`, for any permutation and fan-out."""
    from dsv3_min.moe import gather_rows

    g = torch.Generator().manual_seed(seed)
    n = n_src * fanout
    index = torch.randperm(n, generator=g)
    inverse = torch.empty_like(index).scatter_(0, index, torch.arange(n))
    src = torch.randn(n_src, d, generator=g, dtype=torch.float64)
    up = torch.randn(n, d, generator=g, dtype=torch.float64)
    a, b = src.clone().requires_grad_(), src.clone().requires_grad_()
    out_a, out_b = gather_rows(a, index, inverse, fanout), b[index // fanout]
    (out_a * up).sum().backward()
    (out_b * up).sum().backward()
    assert torch.equal(out_a, out_b)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
