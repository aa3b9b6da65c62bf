"""Tests for dsv3_min.mla: naive == absorbed, cache size, cached decoding (dynamic and static), parity with
transformers."""
import warnings

import pytest
import torch
from test_attention import assert_static_equals_dynamic, assert_static_step_has_no_host_sync

from conftest import prefill_then_decode, tiny_config
from dsv3_min.attention import KVCache, LayerCache
from dsv3_min.config import get_preset
from dsv3_min.mla import LatentCache, MultiHeadLatentAttention
from dsv3_min.rope import RotaryEmbedding

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformers
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
transformers.logging.set_verbosity_error()

V3_YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
               mscale=1.0, mscale_all_dim=1.0)
VARIANTS = {"q_lora": {}, "no_q_lora": {"q_lora_rank": None},
            "yarn": {"rope_scaling": V3_YARN, "max_position_embeddings": 163_840},
            "bias_gate": {"attention_bias": True, "gated_attention": True}}


def _randomize(m, seed=0, scale=0.2):
    """Every parameter random; RMSNorm gains around 1 so the norms are exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.2 * r if "layernorm" in name else scale * r)
    return m.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_absorbed_equals_naive_fp64(variant):
    """In fp64 the absorbed path (prefill into a LatentCache, and token-by-token decoding) equals the naive full
    forward to 1e-10: the two paths compute the same function."""
    cfg = tiny_config(**VARIANTS[variant])
    mla = _randomize(MultiHeadLatentAttention(cfg).double())
    rope = RotaryEmbedding.from_config(cfg)
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64)
    cos, sin = rope(torch.arange(9))
    with torch.no_grad():
        naive = mla(x, cos, sin)
        prefill = mla(x, cos, sin, LatentCache(2, 9, cfg.kv_lora_rank, cfg.qk_rope_head_dim, torch.float64))
        cache = LatentCache(2, 9, cfg.kv_lora_rank, cfg.qk_rope_head_dim, torch.float64)
        steps = torch.cat([mla(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache) for t in range(9)], 1)
    assert (prefill - naive).abs().max() < 1e-10
    assert (steps - naive).abs().max() < 1e-10
    assert naive.abs().max() > 1e-2  # the comparison is not between two zero tensors


def _numbers_per_token(cache, batch, max_len):
    """All elements of all the cache's buffers, per token slot."""
    return sum(t.numel() for t in cache.buffers.values()) // (batch * max_len)


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v3"])
def test_cache_sizes(preset):
    """The absorbed LatentCache holds exactly kv_lora_rank + qk_rope_head_dim numbers per token per layer (counted
    over all its buffers); the naive KVCache holds heads * (qk_head_dim + v_head_dim). V3: 576 vs 40,960."""
    cfg = tiny_config() if preset == "tiny" else get_preset("deepseek-v3")
    with torch.device("meta"):
        absorb = MultiHeadLatentAttention(cfg.replace(mla_impl="absorb")).new_cache(3, 7, device="meta")
        naive = MultiHeadLatentAttention(cfg.replace(mla_impl="naive")).new_cache(3, 7, device="meta")
    assert isinstance(absorb, LatentCache) and isinstance(naive, KVCache) and isinstance(absorb, LayerCache)
    assert _numbers_per_token(absorb, 3, 7) == cfg.kv_lora_rank + cfg.qk_rope_head_dim == absorb.numbers_per_token
    assert _numbers_per_token(naive, 3, 7) == cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    if preset == "deepseek-v3":
        assert _numbers_per_token(absorb, 3, 7) * 2 * cfg.num_hidden_layers == 70_272
        assert _numbers_per_token(naive, 3, 7) * 2 * cfg.num_hidden_layers == 4_997_120


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_cached_decoding_equals_full_forward(impl, backend):
    """Prefill 4 tokens, then decode 6 one at a time through the cache of cfg.mla_impl: equals the full forward
    (fp32, atol 1e-5)."""
    cfg = tiny_config(mla_impl=impl, attn_backend=backend)
    mla, rope = _randomize(MultiHeadLatentAttention(cfg), scale=0.1), RotaryEmbedding.from_config(cfg)
    x = torch.randn(2, 10, cfg.hidden_size)
    full, stepwise, cache = prefill_then_decode(mla, rope, x)
    assert cache.length == 10
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("variant", ["q_lora", "bias_gate"])
def test_static_cache_equals_dynamic(impl, variant):
    """MLA with a static cache (naive KVCache, absorbed LatentCache; fixed shapes, mask from the cache) equals the
    dynamic cache over a prefill and token-by-token decoding, and a left-padded sequence equals its own unpadded run
    (fp32, 1e-5; the padded positions are shifted by 3, equal up to rounding because RoPE is relative)."""
    cfg = tiny_config(mla_impl=impl, **VARIANTS[variant])
    mla = _randomize(MultiHeadLatentAttention(cfg), scale=0.1)
    assert_static_equals_dynamic(mla, RotaryEmbedding.from_config(cfg), cfg.hidden_size)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_static_step_has_no_host_sync(impl, monkeypatch):
    """A static-cache decoding step of MLA (naive and absorbed) never reads a Python value from a tensor: on a GPU
    it has no host sync and can be captured in a CUDA graph (see the helper in test_attention)."""
    cfg = tiny_config(mla_impl=impl)
    mla = _randomize(MultiHeadLatentAttention(cfg), scale=0.1)
    assert_static_step_has_no_host_sync(mla, RotaryEmbedding.from_config(cfg), cfg.hidden_size, monkeypatch)


def test_latent_cache_static_update():
    """A static LatentCache writes latent and k_pe at [pos, pos + s) and returns the full buffers (shared LayerCache
    logic); a dynamic one appends and returns the prefix."""
    c = LatentCache(2, 5, kv_lora_rank=3, rope_dim=2, static=True)
    lat, pe = torch.randn(2, 2, 3), torch.randn(2, 2, 2)
    c.pos.fill_(1)
    full_lat, full_pe = c.update(lat, pe)
    assert full_lat.shape == (2, 5, 3) and torch.equal(full_lat[:, 1:3], lat) and torch.equal(full_pe[:, 1:3], pe)
    d = LatentCache(2, 5, kv_lora_rank=3, rope_dim=2)
    assert [t.shape for t in d.update(lat, pe)] == [(2, 2, 3), (2, 2, 2)] and d.length == 2


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "yarn", "no_q_lora_yarn_bias"])
def test_matches_transformers(variant):
    """With transformers' DeepseekV3Attention weights loaded strictly (same names and shapes), our naive forward and
    our absorbed token-by-token decoding equal transformers' output (fp32, atol 1e-5, rtol 1e-5)."""
    kw = VARIANTS.get(variant) or {"q_lora_rank": None, "rope_scaling": V3_YARN, "max_position_embeddings": 163_840,
                                   "attention_bias": True}
    cfg = tiny_config(**kw)
    hf_cfg = DeepseekV3Config(**cfg.to_hf())
    hf_cfg._attn_implementation = "sdpa"
    ref = _randomize(hf.DeepseekV3Attention(hf_cfg, layer_idx=0), scale=0.1)
    ours = MultiHeadLatentAttention(cfg.replace(mla_impl="absorb")).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 11, cfg.hidden_size)
    pos = torch.arange(11)
    cos, sin = RotaryEmbedding.from_config(cfg)(pos)
    with torch.no_grad():
        expected, _ = ref(x, hf.DeepseekV3RotaryEmbedding(hf_cfg)(x, pos[None]), attention_mask=None)
        naive = ours(x, cos, sin)
        cache = ours.new_cache(2, 11)
        absorbed = torch.cat([ours(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache) for t in range(11)], 1)
    torch.testing.assert_close(naive, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(absorbed, expected, atol=1e-5, rtol=1e-5)


def test_parameter_names_match_transformers():
    """Our parameter names and shapes are exactly transformers' (with and without q_lora_rank, with biases)."""
    for kw in ({}, {"q_lora_rank": None}, {"attention_bias": True}):
        cfg = tiny_config(**kw)
        ours = {k: v.shape for k, v in MultiHeadLatentAttention(cfg).state_dict().items()}
        theirs = {k: v.shape for k, v in hf.DeepseekV3Attention(DeepseekV3Config(**cfg.to_hf()), 0).state_dict().items()}
        assert ours == theirs


def test_is_causal():
    """Changing a later token does not change earlier outputs (naive forward and absorbed prefill)."""
    cfg = tiny_config()
    mla, rope = _randomize(MultiHeadLatentAttention(cfg), scale=0.1), RotaryEmbedding.from_config(cfg)
    x = torch.randn(1, 6, cfg.hidden_size)
    y = x.clone()
    y[:, 4] += 1.0
    cos, sin = rope(torch.arange(6))
    new = lambda: LatentCache(1, 6, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    with torch.no_grad():
        for cache_a, cache_b in ((None, None), (new(), new())):
            a, b = mla(x, cos, sin, cache_a), mla(y, cos, sin, cache_b)
            torch.testing.assert_close(a[:, :4], b[:, :4])
            assert (a[:, 4] - b[:, 4]).abs().max() > 1e-4


def test_bad_input_raises():
    """Wrong hidden size, cache overflow and wrongly shaped cache updates raise ValueError with the shapes."""
    cfg = tiny_config(mla_impl="absorb")
    mla, rope = MultiHeadLatentAttention(cfg), RotaryEmbedding.from_config(cfg)
    with pytest.raises(ValueError, match=r"expected x \(b, s, 64\), got \(1, 3, 32\)"):
        mla(torch.randn(1, 3, 32), *rope(torch.arange(3)))
    cache = mla.new_cache(1, 2)
    with pytest.raises(ValueError, match="overflow, 0 cached \\+ 3 new tokens > max_len 2"):
        mla(torch.randn(1, 3, 64), *rope(torch.arange(3)), cache)
    with pytest.raises(ValueError, match=r"expected latent \(b=1, s_new, 24\).*got latent \(1, 1, 20\)"):
        cache.update(torch.randn(1, 1, 20), torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match="cache must be"):
        mla(torch.randn(1, 1, 64), *rope(torch.arange(1)), cache="nope")
