"""Tests of dsv3_min.optim: the LR schedule, the AdamW parameter groups, Muon (against torch.optim.Muon and
torch.optim.AdamW, per expert, and exact resume), and the FLOPs-per-token formula (closed forms, and the matmul FLOPs
PyTorch really runs, counted by torch.utils.flop_counter.FlopCounterMode)."""
import math

import pytest
import torch
from _tiny_run import losses, tiny_corpus_fixture, train_argv  # noqa: F401 (a fixture)
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_optimizer_state_refused, tiny_config
from dsv3_min.__main__ import main
from dsv3_min.model import DeepSeekV3
from dsv3_min.optim import (
    Muon,
    flops_per_token,
    lr_at,
    make_optimizer,
    mfu,
    muon_param_groups,
    newton_schulz,
    param_groups,
)
from dsv3_min.train import TrainConfig


def test_lr_schedule_shape():
    """Warm-up is linear to the peak, the plateau holds it, the cosine falls monotonically to exactly lr*min_lr_ratio
    at the last step; with a time budget the schedule follows the clock when that is further along."""
    tc = TrainConfig(max_steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1, decay_frac=0.5)
    lrs = [lr_at(s, tc) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10:50] == pytest.approx([1.0] * 40)  # progress s/99 <= 0.5
    assert lrs[99] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[50:], lrs[51:]))  # the decay never goes back up
    assert lrs[70] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (70 / 99 - 0.5) / 0.5)))
    timed = TrainConfig(max_steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1, decay_frac=0.5, time_budget=60.0)
    assert lr_at(20, timed, elapsed=10.0) == 1.0 and lr_at(20, timed, elapsed=60.0) == pytest.approx(0.1)
    assert lr_at(20, timed, elapsed=45.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    no_decay = TrainConfig(max_steps=10, warmup=1, lr=1.0, decay_frac=0.0, time_budget=5.0)
    assert lr_at(5, no_decay, elapsed=9.0) == pytest.approx(0.1)  # past the budget: the floor, no division by zero


def test_param_groups_decay_matrices_only():
    """Every ≥2-D parameter except the embedding decays; norms, biases and the embedding do not; none is lost."""
    model = DeepSeekV3(tiny_config())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and "embed_tokens" not in names[id(p)] for p in decay["params"])
    assert any("embed_tokens" in names[id(p)] for p in no_decay["params"])
    assert any("norm" in names[id(p)] and p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_dense_closed_form():
    """For a dense MHA model without MTP the formula reduces to 6·(L·(4d²+3dI) + Vd) + 6·L·S·d."""
    L, d, I, V, H, S = 3, 64, 96, 97, 4, 128
    cfg = tiny_config(attention="gqa", num_hidden_layers=L, first_k_dense_replace=L, num_nextn_predict_layers=0,
                      hidden_size=d, intermediate_size=I, vocab_size=V, num_attention_heads=H)
    assert flops_per_token(cfg, S) == 6 * (L * (4 * d * d + 3 * d * I) + V * d) + 6 * L * S * d
    assert mfu(1000.0, cfg, S, 1e12) == pytest.approx(1000.0 * flops_per_token(cfg, S) / 1e12)
    assert mfu(1000.0, cfg, S, None) is None


def test_flops_per_token_counts_active_experts_and_mtp():
    """Matmul parameters in the formula equal the real model's active matrices (k of E experts), MTP included."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    n = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.startswith("embed_tokens"):
            continue
        n += p.numel() * k // E if ".experts." in name else p.numel()
    n += cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size  # the MTP depth reuses lm_head
    attn = 3 * (cfg.num_hidden_layers + 1) * cfg.num_attention_heads * 16 * (cfg.qk_head_dim + cfg.v_head_dim)
    assert flops_per_token(cfg, 16) == 6 * n + attn


def _counted(cfg, B, S) -> int:
    "FLOPs FlopCounterMode counts for one forward + backward of `model.loss` on a (B, S) batch."
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    x = torch.randint(0, cfg.vocab_size, (B, S + 1))
    with FlopCounterMode(display=False) as counter:
        model.loss(x[:, :-1], x[:, 1:]).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("over", [{}, dict(attention="gqa"), dict(q_lora_rank=None), dict(tie_word_embeddings=True)],
                         ids=["mla", "gqa", "mla-no-q-lora", "tied"])
def test_flops_per_token_matches_flop_counter(over):
    """FlopCounterMode counts every matmul (mm, bmm, addmm) of a forward+backward and nothing elementwise (norms, RoPE,
    softmax, SwiGLU products are not counted by either side). Per token it must equal the formula EXACTLY, once the
    two known differences are added: the eager attention computes the full S×S square (the formula counts the causal
    half: + 3·L·H·S·(dqk+dv)), and the balance loss is one einsum Σ_e f_e·P_e per MoE layer (2BE forward + 2BE
    backward). The MoE runs its `loop` implementation (exactly k experts' work per token; `grouped` pads on CPU)."""
    cfg = tiny_config(moe_impl="loop", num_nextn_predict_layers=0, **over)
    B, S = 2, 32
    dqk, dv = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.attention == "mla" else (cfg.head_dim, cfg.head_dim)
    full_square = 3 * cfg.num_hidden_layers * cfg.num_attention_heads * S * (dqk + dv)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    expected = B * S * (flops_per_token(cfg, S) + full_square) + n_moe * 4 * B * cfg.n_routed_experts
    assert _counted(cfg, B, S) == expected


def test_flops_per_token_mtp_matches_flop_counter():
    """With MTP depth 1 the MTP block runs on S-1 positions (the formula rounds that to S per token): the counted
    FLOPs added by MTP equal B·(S-1)·(6·N_mtp + 6·H·(S-1)·(dqk+dv)) + the MTP MoE's balance einsum, exactly, where
    6·N_mtp is what the formula adds for MTP minus its attention term."""
    B, S = 2, 32
    base, mtp = (tiny_config(moe_impl="loop", num_nextn_predict_layers=D) for D in (0, 1))
    H, dqkv = mtp.num_attention_heads, mtp.qk_head_dim + mtp.v_head_dim
    six_n_mtp = flops_per_token(mtp, S) - flops_per_token(base, S) - 3 * H * S * dqkv
    added = B * (S - 1) * (six_n_mtp + 6 * H * (S - 1) * dqkv) + 4 * B * mtp.n_routed_experts
    assert _counted(mtp, B, S) - _counted(base, B, S) == added


# ----- Muon -----
def _steps(ours: torch.optim.Optimizer, ours_params, theirs: torch.optim.Optimizer, their_params, slices, n=5, atol=0.0):
    "`n` steps of both on the same random gradients; `slices(t)` maps one of ours to the list of theirs (same order)."
    for _ in range(n):
        for p in ours_params:
            p.grad = torch.randn_like(p)
        for q, g in zip(their_params, [g for p in ours_params for g in slices(p.grad)]):
            q.grad = g.clone()
        ours.step()
        theirs.step()
    for q, a in zip(their_params, [a for p in ours_params for a in slices(p.detach())]):
        torch.testing.assert_close(a, q.detach(), rtol=0, atol=atol)


def test_muon_equals_torch_muon_on_matrices():
    """On 2-D parameters (wide, tall, square, and two of one shape, which share one batched Newton–Schulz call) five
    steps of `Muon` equal `torch.optim.Muon` with adjust_lr_fn="match_rms_adamw", same lr, weight decay and momentum,
    bit for bit on CPU (the measured difference is 0, so the tolerance is 0)."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in [(32, 48), (48, 32), (40, 40), (32, 48)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    _steps(Muon([dict(params=ours, muon=True)], lr=0.02, weight_decay=0.1), ours,
           torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), theirs,
           lambda t: [t])


def test_muon_per_expert_equals_looping_torch_muon_over_slices():
    """Stacked experts: `gate_up_proj` (E, 2I, d) with blocks=2 and `down_proj` (E, d, I) step exactly like
    `torch.optim.Muon` looped over the 3E slices (each expert's gate rows, up rows and down matrix on their own), up to
    bf16 rounding: a batched matmul may round differently from one matrix's (measured 3.8e-5 after 5 steps of about
    4e-3 per number; tolerance 4e-4)."""
    torch.manual_seed(0)
    E, inter, d = 4, 8, 24
    gate_up, down = torch.nn.Parameter(torch.randn(E, 2 * inter, d) * 0.1), torch.nn.Parameter(torch.randn(E, d, inter))

    def slices(t):
        return [x for e in range(E) for x in ((t[e, :inter], t[e, inter:]) if t.shape[1] == 2 * inter else (t[e],))]
    theirs = [torch.nn.Parameter(x.detach().clone()) for p in (gate_up, down) for x in slices(p)]
    ours = Muon([dict(params=[gate_up], muon=True, blocks=2), dict(params=[down], muon=True)], lr=0.02)
    _steps(ours, [gate_up, down], torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="match_rms_adamw"), theirs, slices,
           atol=4e-4)


def test_muon_adamw_groups_equal_torch_adamw():
    """Groups with muon=False take AdamW's step: equal to `torch.optim.AdamW` (same betas, eps, decoupled decay)."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(10,), (7, 5)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    _steps(Muon([dict(params=ours, muon=False)], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95)), ours,
           torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), foreach=False), theirs,
           lambda t: [t])


def test_newton_schulz_singular_values_near_one():
    """For matrices whose singular values span 1 to 1e-2 (wide, tall, and a batch), the 5-step iteration's output has
    every singular value in [0.6, 1.25] (in exact arithmetic the reference quintic maps every σ/‖G‖_F ≥ 1.3e-3 into
    [0.60, 1.21]) and keeps the singular vectors (cosine similarity with the exact U Vᵀ above 0.97)."""
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32), (3, 24, 40)]:
        m, n = shape[-2:]
        u = torch.linalg.qr(torch.randn(*shape[:-2], m, min(m, n)))[0]
        v = torch.linalg.qr(torch.randn(*shape[:-2], n, min(m, n)))[0]
        g = u @ torch.diag_embed(torch.logspace(0, -2, min(m, n)).expand(*shape[:-2], -1)) @ v.mT
        o = newton_schulz(g).float()
        sv = torch.linalg.svdvals(o)
        assert o.shape == g.shape and sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())
        assert torch.nn.functional.cosine_similarity(o.flatten(-2), (u @ v.mT).flatten(-2), dim=-1).min() > 0.97


def test_muon_param_groups_roles():
    """Muon takes every hidden matrix (attention, dense and shared FFN, the router's weight, MTP's eh_proj, the
    stacked experts with gate_up_proj split in 2 row blocks); AdamW keeps the embedding, the head and 1-D tensors;
    the head decays, the embedding and 1-D tensors do not; every parameter is in exactly one group."""
    model = DeepSeekV3(tiny_config())
    groups = muon_param_groups(model, 0.1)
    role = {n: g for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) == len(role)
    for n, p in model.named_parameters():
        g = role[n]
        assert g["muon"] == (p.ndim >= 2 and n not in ("embed_tokens.weight", "lm_head.weight")), n
        assert g["blocks"] == (2 if n.endswith("experts.gate_up_proj") else 1), n
        assert g["weight_decay"] == (0.1 if p.ndim >= 2 and n != "embed_tokens.weight" else 0.0), n
    assert role["layers.1.mlp.gate.weight"]["muon"] and role["mtp.0.eh_proj.weight"]["muon"]
    assert isinstance(make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")), Muon)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def test_muon_resume_reproduces_losses_exactly(tiny_corpus, tmp_path, capsys):
    """`--set optimizer=muon`: an 8-step run, and a run stopped (checkpoint written) after step 4 then resumed to 8,
    log bit-identical losses: the momentum buffers and AdamW moments round-trip through the checkpoint. Resuming
    that run as AdamW is refused with one line (its optimizer state is Muon's)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    muon = ["--set", "optimizer=muon", "--max-steps", "8"]
    assert main(train_argv(tiny_corpus, "--out", str(full), *muon)) == 0
    assert main(train_argv(tiny_corpus, "--out", str(cut), *muon, "--set", "stop_at=4")) == 0
    assert [s for s, _ in losses(cut)] == [1, 2, 3, 4]
    capsys.readouterr()
    assert main(train_argv(tiny_corpus, "--out", str(cut), "--max-steps", "8", "--set", "optimizer=adamw", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3: error:") and err.count("\n") == 1, err
    assert main(train_argv(tiny_corpus, "--out", str(cut), *muon, "--resume")) == 0
    assert losses(full) == losses(cut) and len(losses(full)) == 8


def test_muon_checkpoint_with_a_renamed_momentum_is_refused(tmp_path):
    """A Muon checkpoint whose momentum buffer is renamed for one parameter is refused in one line before anything is
    loaded (the names a parameter may keep are AdamW's or Muon's); the intact one loads and steps on identically."""
    from safetensors.torch import load_file

    from dsv3_min.checkpoint import load_checkpoint, save_checkpoint
    cfg, tc = tiny_config(), TrainConfig(lr=1e-2, optimizer="muon")
    model = DeepSeekV3(cfg)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    model.loss(x[:, :-1], x[:, 1:]).loss.backward()
    opt.step()
    ckpt = save_checkpoint(tmp_path, 1, model, opt, cfg, tc)
    fresh = DeepSeekV3(cfg)
    fresh_opt = make_optimizer(fresh, tc, torch.device("cpu"))
    load_checkpoint(ckpt, fresh, fresh_opt, cfg)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m.zero_grad()
        m.loss(x[:, :-1], x[:, 1:]).loss.backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    sd = load_file(str(ckpt / "optimizer.safetensors"))
    key = next(k for k in sd if k.endswith(".momentum_buffer"))
    sd[key.replace("momentum_buffer", "momentum")] = sd.pop(key)
    assert_optimizer_state_refused(ckpt, sd, cfg, tc)


def test_muon_under_torchrun_ep2_matches_single_process(tiny_corpus, tmp_path):
    """`torchrun --nproc-per-node 2 ... --set ep=2 optimizer=muon` on CPU (gloo): the parameters are DTensors (FSDP2
    shards, experts over the (dp, ep) mesh), so each update is orthogonalised on the whole matrix (gathered) and every
    rank keeps its shard. Per-step losses equal the single-process Muon run within 7e-6 relative (measured 7.0e-7)."""
    import os
    import subprocess
    import sys
    args = lambda out, *x: train_argv(tiny_corpus, "--out", str(out), "--max-steps", "6", "--set", "device=cpu",  # noqa: E731
                                      "optimizer=muon", *x)
    assert main(args(tmp_path / "one")) == 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "dsv3_min", *args(tmp_path / "ep2", "ep=2")], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    one, ep2 = losses(tmp_path / "one"), losses(tmp_path / "ep2")
    assert [s for s, _ in one] == [s for s, _ in ep2] == list(range(1, 7))
    for (_, a), (_, b) in zip(one, ep2):
        assert abs(a - b) <= 7e-6 * abs(a)
