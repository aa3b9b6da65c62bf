"""Tests for dsv3_min.attention: attend (backends, masks), KVCache, GroupedQueryAttention."""
import importlib.util
import warnings

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_min.attention import GroupedQueryAttention, KVCache, attend, causal_mask
from dsv3_min.rope import RotaryEmbedding
from tests.conftest import tiny_config

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformers
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
transformers.logging.set_verbosity_error()


def _by_the_formula(q, k, v, causal, scale):
    """softmax(q k^T scale) v with explicit loops; query i is token i + sk - sq; head j uses K/V head j // (hq/hkv)."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=q.dtype)
    for h in range(hq):
        kh, vh = k[:, h // (hq // hkv)], v[:, h // (hq // hkv)]
        for i in range(sq):
            s = (kh @ q[:, h, i, :, None])[..., 0] * scale
            if causal:
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
    """With 2 queries over 4 keys, query 0 (token 2) sees keys 0..2 and query 1 (token 3) sees all."""
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("sq,sk", [(7, 7), (3, 7), (1, 7)])
@pytest.mark.parametrize("causal", [True, False])
def test_backends_agree_with_eager(backend, hq, hkv, sq, sk, causal):
    """sdpa and flash (notebook 10's kernel if present, else its SDPA fallback) equal eager in fp32 (atol 1e-5),
    for MHA/GQA/MQA, prefill and decode shapes, causal and not, with dv != dqk."""
    q, k, v = torch.randn(2, hq, sq, 16), torch.randn(2, hkv, sk, 16), torch.randn(2, hkv, sk, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attend(q, k, v, causal, backend=backend)
    torch.testing.assert_close(out, attend(q, k, v, causal, backend="eager"), atol=1e-5, rtol=1e-5)


def test_eager_bf16_softmax_in_fp32():
    """bf16 inputs give bf16 outputs close to the fp32 computation (the softmax itself runs in fp32)."""
    q, k, v = torch.randn(1, 4, 16, 32), torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32)
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attend(q, k, v), atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(importlib.util.find_spec("dsv3_min.flash") is not None, reason="notebook 10's kernel exists")
def test_flash_fallback_warns_once():
    """Without dsv3_min.flash, backend='flash' warns (once) and returns the SDPA result."""
    import dsv3_min.attention as A
    A._warned.discard("flash")
    q = torch.randn(1, 2, 4, 8)
    with pytest.warns(UserWarning, match="falling back"):
        attend(q, q, q, backend="flash")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attend(q, q, q, backend="flash")  # second call: no warning


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_attn_missing_is_a_clear_error():
    """backend='flash_attn' without the package raises ImportError naming it."""
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ImportError, match="flash_attn"):
        attend(q, q, q, backend="flash_attn")


def test_attend_bad_shapes():
    """Non-dividing head counts, mismatched dims, sq > sk with causal, or an unknown backend raise ValueError."""
    with pytest.raises(ValueError, match=r"got q \(1, 4, 3, 8\), k \(1, 3, 3, 8\)"):
        attend(torch.zeros(1, 4, 3, 8), torch.zeros(1, 3, 3, 8), torch.zeros(1, 3, 3, 8))
    with pytest.raises(ValueError, match="k \\(b=1, hkv, sk, 8\\)"):
        attend(torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 6), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="sq=4, sk=3"):
        attend(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="backend"):
        attend(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), backend="nope")


def test_kvcache_appends_and_errors():
    """KVCache returns everything cached so far; wrong shapes and overflow raise ValueError with the shapes."""
    c = KVCache(batch=2, max_len=5, n_heads=3, k_dim=4, v_dim=6)
    k1, v1 = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 6)
    k2, v2 = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 6)
    c.update(k1, v1)
    ka, va = c.update(k2, v2)
    assert c.length == 5
    torch.testing.assert_close(ka, torch.cat([k1, k2], 2))
    torch.testing.assert_close(va, torch.cat([v1, v2], 2))
    with pytest.raises(ValueError, match="overflow, 5 cached \\+ 1 new tokens > max_len 5"):
        c.update(k1[:, :, :1], v1[:, :, :1])
    c.reset()
    with pytest.raises(ValueError, match=r"expected k \(b=2, h=3, s_new, 4\).*got k \(2, 2, 1, 4\)"):
        c.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 6))
    with pytest.raises(ValueError, match="got k \\(2, 3, 1, 4\\) and v \\(2, 3, 2, 6\\)"):
        c.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 2, 6))


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_gqa_cached_decoding_equals_full_forward(kv, gated, backend):
    """Prefill 4 tokens then decode 6 one at a time through the KVCache: equals the full 10-token forward
    (fp32, atol 1e-5)."""
    cfg = tiny_config(attention="gqa", num_key_value_heads=kv, gated_attention=gated, attn_backend=backend)
    attn, rope = GroupedQueryAttention(cfg).eval(), RotaryEmbedding.from_config(cfg)
    x = torch.randn(2, 10, cfg.hidden_size)
    with torch.no_grad():
        full = attn(x, *rope(torch.arange(10)))
        cache = attn.new_cache(2, 10)
        out = [attn(x[:, :4], *rope(torch.arange(4)), cache)]
        out += [attn(x[:, t:t + 1], *rope(torch.arange(t, t + 1)), cache) for t in range(4, 10)]
    assert cache.length == 10 and cache.k.shape == (2, kv, 10, cfg.head_dim)
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


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
