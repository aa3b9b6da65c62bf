"""Tests for dsv3_min.attention: attend (backends, masks), the caches (dynamic and static), GroupedQueryAttention."""
import importlib.util
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

import dsv3_min.flash_backend  # noqa: F401 (registers attn_backend='flash', as dsv3_min.model does)
from conftest import prefill_then_decode, tiny_config
from dsv3_min.attention import GroupedQueryAttention, KVCache, LayerCache, attend, attention_probs, causal_mask
from dsv3_min.rope import RotaryEmbedding

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformers
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
transformers.logging.set_verbosity_error()


def _by_the_formula(q, k, v, causal, softmax_scale, mask=None):
    """softmax(q k^T softmax_scale) v with explicit loops; query i is token i + sk - sq; head j uses K/V head
    j // (hq/hkv); an explicit mask (b, 1 or hq, sq, sk), True = visible, replaces the causal rule."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=q.dtype)
    for h in range(hq):
        kh, vh = k[:, h // (hq // hkv)], v[:, h // (hq // hkv)]
        for i in range(sq):
            s = (kh @ q[:, h, i, :, None])[..., 0] * softmax_scale
            if mask is not None:
                s = s.masked_fill(~mask[:, min(h, mask.shape[1] - 1), i], float("-inf"))
            elif causal:
                s[:, i + sk - sq + 1:] = float("-inf")
            out[:, h, i] = (s.softmax(-1)[..., None] * vh).sum(1)
    return out


@settings(max_examples=20, deadline=None)
@given(hkv=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 4]), sk=st.integers(1, 9), data=st.data(),
       causal=st.booleans(), dqk=st.sampled_from([4, 8]), dv=st.sampled_from([4, 6]))
def test_eager_equals_formula(hkv, group, sk, data, causal, dqk, dv):
    """Eager attention equals the textbook formula (explicit loops, fp64, atol 1e-12) for MHA/GQA/MQA, sq <= sk
    with the bottom-right causal mask, and dv != dqk."""
    sq = data.draw(st.integers(1, sk))
    g = torch.Generator().manual_seed(sk * 100 + sq)
    q = torch.randn(2, hkv * group, sq, dqk, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, sk, dqk, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, sk, dv, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attend(q, k, v, causal, 0.37), _by_the_formula(q, k, v, causal, 0.37),
                               rtol=1e-12, atol=1e-12)


def test_causal_mask_bottom_right():
    """With 2 queries over 4 keys, query 0 (token 2) sees keys 0..2 and query 1 (token 3) sees all (True = visible);
    a (rows, cols) tile is the same slice of the full mask."""
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert torch.equal(causal_mask(7, 11, rows=range(2, 5), cols=range(6, 10)), causal_mask(7, 11)[2:5, 6:10])


@pytest.mark.parametrize("heads", [1, 4])
def test_explicit_mask_eager_and_sdpa(heads):
    """An explicit bool mask (True = visible, per batch row or per head) gives the formula's result in eager (fp64,
    1e-12) and SDPA agrees in fp32 (1e-5); `causal_mask` passed explicitly equals causal=True bit for bit."""
    g = torch.Generator().manual_seed(heads)
    q, k, v = (torch.randn(2, h, s, 8, generator=g, dtype=torch.float64) for h, s in ((4, 5), (2, 9), (2, 9)))
    mask = torch.rand(2, heads, 5, 9, generator=g) < 0.5
    mask[..., 0] = True
    eager = attend(q, k, v, mask=mask, softmax_scale=0.3)
    torch.testing.assert_close(eager, _by_the_formula(q, k, v, False, 0.3, mask), rtol=1e-12, atol=1e-12)
    sdpa = attend(q.float(), k.float(), v.float(), mask=mask, softmax_scale=0.3, backend="sdpa")
    torch.testing.assert_close(sdpa, eager.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(attend(q, k, v, mask=causal_mask(5, 9)[None, None]), attend(q, k, v, causal=True))


@pytest.mark.parametrize("backend", ["flash", "flash_attn"])
def test_mask_on_maskless_backend_falls_back_to_sdpa(backend, monkeypatch):
    """'flash' and 'flash_attn' cannot take an explicit mask: a masked call warns once and returns SDPA's result."""
    import dsv3_min.attention as A

    monkeypatch.setattr(A, "_warned", set())
    q, mask = torch.randn(1, 2, 4, 8), torch.rand(1, 1, 4, 4) < 0.5
    mask[..., 0] = True
    with pytest.warns(UserWarning, match="takes no explicit mask"):
        out = attend(q, q, q, backend=backend, mask=mask)
    assert torch.equal(out, attend(q, q, q, backend="sdpa", mask=mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attend(q, q, q, backend=backend, mask=mask)


def test_bad_mask_raises():
    """A mask that is not bool, or whose shape does not broadcast to (b, hq, sq, sk), raises ValueError naming it."""
    q = torch.zeros(2, 4, 3, 8)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor .*got torch.float32 \(2, 1, 3, 3\)"):
        attend(q, q, q, mask=torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"got torch.bool \(2, 2, 3, 3\)"):
        attend(q, q, q, mask=torch.ones(2, 2, 3, 3, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("sq,sk", [(7, 7), (3, 7), (1, 7)])
@pytest.mark.parametrize("causal", [True, False])
def test_backends_agree_with_eager(backend, hq, hkv, sq, sk, causal):
    """sdpa and flash (notebook 12's kernel, SDPA for decode shapes) equal eager in fp32 (atol 1e-5),
    for MHA/GQA/MQA, prefill and decode shapes, causal and not, with dv != dqk."""
    q, k, v = torch.randn(2, hq, sq, 16), torch.randn(2, hkv, sk, 16), torch.randn(2, hkv, sk, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attend(q, k, v, causal, backend=backend)
    torch.testing.assert_close(out, attend(q, k, v, causal, backend="eager"), atol=1e-5, rtol=1e-5)


def test_eager_bf16_softmax_in_fp32():
    """With bf16 inputs the softmax runs in fp32: the probabilities come back fp32 and equal an fp32 softmax of the
    same bf16 scores to 1e-6. A bf16 softmax rounds them to 8 significant bits and fails this test (measured max error
    1.9e-3 here, against exactly 0 for the fp32 softmax); the bf16 output stays within 3e-2 of fp32."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 16, 32, generator=g) for h in (4, 2, 2))
    qb, kb = q.bfloat16(), k.bfloat16()
    probs = attention_probs(qb, kb)
    assert probs.dtype == torch.float32
    scores = torch.einsum("bhgqd,bhkd->bhgqk", rearrange(qb, "b (h g) q d -> b h g q d", h=2), kb) * 32**-0.5
    scores = scores.float().masked_fill(~causal_mask(16, 16), float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1), atol=1e-6, rtol=0)
    out = attend(qb, kb, v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attend(q, k, v), atol=3e-2, rtol=3e-2)


def test_flash_backend_registers_itself_without_an_import_circle(monkeypatch):
    """attention.py never imports flash (flash_backend imports attention and registers backend='flash' into its
    registry); a backend that is not registered is a ValueError naming the module to import; `import dsv3_min`
    (through dsv3_min.model) registers every backend of config.ATTN_BACKENDS without loading triton."""
    import dsv3_min.attention as A
    from dsv3_min.config import ATTN_BACKENDS

    source = open(A.__file__).read()
    assert "flash import" not in source and "import_module" not in source
    assert set(A._BACKENDS) == set(ATTN_BACKENDS)  # flash_backend is imported at the top of this file
    monkeypatch.delitem(A._BACKENDS, "flash")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="dsv3_min.flash_backend"):
        attend(q, q, q, backend="flash")
    code = textwrap.dedent("""
        import sys, dsv3_min
        from dsv3_min.attention import _BACKENDS
        from dsv3_min.config import ATTN_BACKENDS
        assert set(_BACKENDS) == set(ATTN_BACKENDS) and "triton" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_attn_missing_is_a_clear_error():
    """backend='flash_attn' without the package raises ImportError naming it."""
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ImportError, match="flash_attn"):
        attend(q, q, q, backend="flash_attn")


def test_attend_bad_shapes():
    """Non-dividing head counts, mismatched dims, sq > sk with causal, or an unknown backend raise ValueError."""
    with pytest.raises(ValueError, match=r"multiple of key/value heads \(3\), got q \(1, 4, 3, 8\), k \(1, 3, 3, 8\)"):
        attend(torch.zeros(1, 4, 3, 8), torch.zeros(1, 3, 3, 8), torch.zeros(1, 3, 3, 8))
    with pytest.raises(ValueError, match="k \\(b=1, hkv, sk, 8\\)"):
        attend(torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 6), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="sq=4, sk=3"):
        attend(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="backend"):
        attend(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), backend="nope")


def test_kvcache_appends_and_errors():
    """A dynamic KVCache returns everything cached so far, (b, t, h, d); wrong shapes and overflow raise ValueError
    with the shapes."""
    c = KVCache(batch=2, max_len=5, n_heads=3, k_dim=4, v_dim=6)
    assert isinstance(c, LayerCache) and not c.static
    k1, v1 = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 6)
    k2, v2 = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 6)
    c.update(k1, v1)
    ka, va = c.update(k2, v2)
    assert c.length == 5 and c.k.shape == (2, 5, 3, 4)
    torch.testing.assert_close(ka, torch.cat([k1, k2], 1))
    torch.testing.assert_close(va, torch.cat([v1, v2], 1))
    with pytest.raises(ValueError, match="overflow, 5 cached \\+ 1 new tokens > max_len 5"):
        c.update(k1[:, :1], v1[:, :1])
    c.reset()
    assert c.length == 0
    with pytest.raises(ValueError, match=r"expected k \(b=2, s_new, 3, 4\) and v \(b=2, s_new, 3, 6\).*got k \(2, 1, 2, 4\)"):
        c.update(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 6))
    with pytest.raises(ValueError, match="got k \\(2, 1, 3, 4\\) and v \\(2, 2, 3, 6\\)"):
        c.update(torch.randn(2, 1, 3, 4), torch.randn(2, 2, 3, 6))
    with pytest.raises(ValueError, match="expected k .* and v"):
        c.update(torch.randn(2, 1, 3, 4))
    assert repr(c) == "KVCache(length=0, k=(2, 5, 3, 4), v=(2, 5, 3, 6), dtype=torch.float32)"


def test_static_cache_writes_at_pos_and_masks():
    """Static mode: update writes the new tokens at slots [pos, pos + s) and returns the full max_len buffers, pos is
    left to the caller, and mask(q_len) is True exactly where start_b <= j <= pos + i (plus the query's own slot)."""
    c = KVCache(batch=2, max_len=6, n_heads=1, k_dim=2, v_dim=2, static=True)
    c.start.copy_(torch.tensor([0, 2]))
    k = torch.arange(1.0, 9.0).reshape(2, 2, 1, 2)
    c.pos.fill_(3)
    k_all, v_all = c.update(k, -k)
    assert k_all.shape == v_all.shape == (2, 6, 1, 2) and int(c.pos) == 3  # full buffers; pos not advanced
    assert torch.equal(k_all[:, 3:5], k) and torch.equal(v_all[:, 3:5], -k)
    assert not k_all[:, :3].any() and not k_all[:, 5:].any()
    m = c.mask(2)
    assert m.shape == (2, 1, 2, 6) and m.dtype == torch.bool
    assert m[0, 0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert m[1, 0].int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    c.pos.fill_(0)  # a padding query (slot 0 < start 2) sees only itself: no all-masked row
    assert c.mask(1)[1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0]]
    assert c.length == 0 and KVCache(1, 2, 1, 2, 2).mask(1) is None  # dynamic caches give no mask
    c.reset()
    assert int(c.pos) == 0 and not c.start.any()
    assert repr(c).startswith("KVCache(static, pos=0, k=(2, 6, 1, 2)")


def test_static_cache_window_returns_and_masks_only_its_slots():
    """With `window` set (the batching engine's rows' span), update still writes at slots [pos, pos + s) but returns
    only the window's slots, and mask(q_len) is the full mask's columns of those slots; reset clears the window."""
    c = KVCache(batch=2, max_len=8, n_heads=1, k_dim=2, v_dim=2, static=True)
    c.start.copy_(torch.tensor([2, 3]))
    c.pos.fill_(4)
    full_mask = c.mask(2)
    c.window = slice(2, 6)
    k = torch.arange(1.0, 9.0).reshape(2, 2, 1, 2)
    k_w, v_w = c.update(k, -k)
    assert k_w.shape == v_w.shape == (2, 4, 1, 2) and torch.equal(k_w, c.k[:, 2:6]) and torch.equal(c.k[:, 4:6], k)
    assert torch.equal(c.mask(2), full_mask[..., 2:6]) and not full_mask[..., :2].any() and not full_mask[..., 6:].any()
    c.reset()
    assert c.window is None and c.mask(1).shape == (2, 1, 1, 8)


def assert_static_step_has_no_host_sync(layer, rope, hidden, monkeypatch):
    """One static-cache decoding step (batch 2, slot 3 of 8: cache update, mask, attention, caller's pos += 1) with
    every tensor-to-Python conversion (item, int, bool, index, float, tolist) patched to raise: on a GPU each would be
    a host sync, which a CUDA graph cannot hold."""
    def boom(*a, **k):
        raise AssertionError("host sync: a Python value was read from a tensor")

    cache = layer.new_cache(2, 8, static=True)
    cache.pos += 3
    x, (cos, sin) = torch.randn(2, 1, hidden), rope(torch.arange(3, 4))
    with torch.no_grad():
        for name in ("item", "__int__", "__bool__", "__index__", "__float__", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, boom)
        out = layer(x, cos, sin, cache)
        cache.pos += 1
        monkeypatch.undo()
    assert out.shape == (2, 1, hidden) and int(cache.pos) == 4 and torch.isfinite(out).all()


def test_static_step_has_no_host_sync(monkeypatch):
    """A static-cache decoding step of GQA never reads a Python value from a tensor (see the helper)."""
    cfg = tiny_config(attention="gqa", num_key_value_heads=2)
    layer = GroupedQueryAttention(cfg).eval()
    assert_static_step_has_no_host_sync(layer, RotaryEmbedding.from_config(cfg), cfg.hidden_size, monkeypatch)


def decode(layer, rope, x, cache, steps, advance=False):
    """Prefill x[:, :steps[0]], then the next tokens in steps; the outputs (b, s, d), positions counted from 0.
    With `advance`, the caller's job in static mode: move cache.pos on after each forward."""
    out, t = [], 0
    with torch.no_grad():
        for s in steps:
            out.append(layer(x[:, t:t + s], *rope(torch.arange(t, t + s)), cache))
            if advance:
                cache.pos += s
            t += s
    return torch.cat(out, 1)


def assert_static_equals_dynamic(layer, rope, hidden, pad=3, n=12, n_prefill=5):
    """Static == dynamic cache over a prefill and token-by-token decoding (batch 2), and a left-padded row (start 3)
    equals its single-sequence dynamic run (positions shifted by 3: equal up to rounding, RoPE is relative). fp32,
    atol = rtol = 1e-5 (measured: below 1e-6)."""
    x = torch.randn(2, n, hidden, generator=torch.Generator().manual_seed(1))
    steps = [n_prefill] + [1] * (n - n_prefill)
    dynamic = decode(layer, rope, x, layer.new_cache(2, n), steps)
    static = decode(layer, rope, x, layer.new_cache(2, n, static=True), steps, advance=True)
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)
    cache = layer.new_cache(2, n, static=True)
    cache.start.copy_(torch.tensor([0, pad]))
    padded = decode(layer, rope, x, cache, steps, advance=True)
    alone = decode(layer, rope, x[1:, pad:], layer.new_cache(1, n - pad), [n_prefill - pad] + steps[1:])
    torch.testing.assert_close(padded[1:, pad:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[:1], dynamic[:1], atol=1e-5, rtol=1e-5)  # the unpadded row is untouched
    assert dynamic.abs().max() > 1e-2  # not a comparison of zeros


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_gqa_static_cache_equals_dynamic(kv, backend):
    """GQA with a static cache (fixed shapes, mask from the cache) equals the dynamic cache, and a left-padded
    sequence equals its own unpadded run (fp32, 1e-5)."""
    cfg = tiny_config(attention="gqa", num_key_value_heads=kv, attn_backend=backend)
    torch.manual_seed(0)
    assert_static_equals_dynamic(GroupedQueryAttention(cfg).eval(), RotaryEmbedding.from_config(cfg), cfg.hidden_size)


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_gqa_cached_decoding_equals_full_forward(kv, gated, backend):
    """Prefill 4 tokens then decode 6 one at a time through the KVCache: equals the full 10-token forward
    (fp32, atol 1e-5)."""
    cfg = tiny_config(attention="gqa", num_key_value_heads=kv, gated_attention=gated, attn_backend=backend)
    attn, rope = GroupedQueryAttention(cfg).eval(), RotaryEmbedding.from_config(cfg)
    x = torch.randn(2, 10, cfg.hidden_size)
    full, stepwise, cache = prefill_then_decode(attn, rope, x)
    assert cache.length == 10 and cache.k.shape == (2, 10, kv, cfg.head_dim)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)


def test_gqa_is_causal():
    """Changing a later token does not change the outputs at earlier positions."""
    cfg = tiny_config(attention="gqa", num_key_value_heads=2)
    attn, rope = GroupedQueryAttention(cfg).eval(), RotaryEmbedding.from_config(cfg)
    x = torch.randn(1, 6, cfg.hidden_size)
    y = x.clone()
    y[:, 4] += 1.0
    with torch.no_grad():
        a, b = attn(x, *rope(torch.arange(6))), attn(y, *rope(torch.arange(6)))
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-3


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_gqa_matches_transformers_llama_attention(kv):
    """GroupedQueryAttention equals transformers' LlamaAttention (same GQA math, rotate_half RoPE) once each
    head's q/k weight rows are permuted from the half layout to consecutive pairs (fp32, atol 1e-5)."""
    cfg = tiny_config(attention="gqa", num_key_value_heads=kv, attention_bias=True)
    hf_cfg = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=kv, head_dim=cfg.head_dim, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                         max_position_embeddings=cfg.max_position_embeddings)
    hf_cfg._attn_implementation = "sdpa"
    ref = LlamaAttention(hf_cfg, layer_idx=0).eval()
    ours = GroupedQueryAttention(cfg).eval()
    to_pairs = lambda w: rearrange(w, "(h two p) ... -> (h p two) ...", two=2, p=cfg.head_dim // 2)
    sd = ref.state_dict()
    for name in ("q_proj", "k_proj"):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = to_pairs(sd[f"{name}.weight"]), to_pairs(sd[f"{name}.bias"])
    ours.load_state_dict(sd)
    x = torch.randn(2, 9, cfg.hidden_size)
    pos = torch.arange(9)
    with torch.no_grad():
        expected, _ = ref(x, LlamaRotaryEmbedding(hf_cfg)(x, pos[None]), attention_mask=None)
        got = ours(x, *RotaryEmbedding.from_config(cfg)(pos))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sdpa_with_mla_head_dims_takes_the_fused_cpu_kernel_and_keeps_eager_gradients():
    """MLA's value head (dv) is narrower than its query/key head (dqk): on the CPU the sdpa backend pads v so that torch
    runs its fused flash kernel rather than the unfused math path (5x slower forward at S=256 in notebook 07's
    measurement), and output and all three gradients still equal eager's in fp32."""
    from torch.profiler import profile
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 33, 24, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 33, 16, generator=g, requires_grad=True)
    do = torch.randn(2, 4, 33, 16, generator=g)
    with profile() as prof:
        out = attend(q, k, v, True, backend="sdpa")
    assert any("flash_attention" in e.key for e in prof.key_averages()), "sdpa took the unfused math path"
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = attend(q, k, v, True, backend="eager")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
