"""Tests for dsv3_min.rope: relative-position property, YaRN closed form, parity with transformers."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from dsv3_min.config import get_preset
from dsv3_min.rope import (
    RotaryEmbedding,
    apply_rope,
    half_to_interleaved,
    interleaved_to_half,
    mla_softmax_scale,
    rope_attention_factor,
    rope_inv_freq,
    yarn_correction_range,
    yarn_get_mscale,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformers
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
transformers.logging.set_verbosity_error()

YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=1.0)


def _rotated_score(rope, q, k, m, n):
    cq, sq = rope(torch.tensor([m]))
    ck, sk = rope(torch.tensor([n]))
    return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 4096), n=st.integers(0, 4096), shift=st.integers(0, 4096), seed=st.integers(0, 2**16),
       yarn=st.booleans())
def test_score_depends_only_on_offset(m, n, shift, seed, yarn):
    """q·k after RoPE at positions (m, n) equals the score at (m+shift, n+shift), within the fp32 angle-rounding
    bound 2|q||k|·pos·2^-24, for plain RoPE and YaRN."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, 32, generator=g), torch.randn(1, 1, 1, 32, generator=g)
    rope = RotaryEmbedding(32, 10000.0, YARN if yarn else None)
    a = _rotated_score(rope, q, k, m, n)
    b = _rotated_score(rope, q, k, m + shift, n + shift)
    bound = 2 * q.norm() * k.norm() * (max(m, n) + shift + 1) * 2**-24
    assert (a - b).abs() <= bound


def test_offset_changes_score():
    """The relative-position test above is not vacuous: a different offset gives a clearly different score."""
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    rope = RotaryEmbedding(32)
    assert (_rotated_score(rope, q, k, 7, 3) - _rotated_score(rope, q, k, 7, 2)).abs() > 1e-2


def test_rotation_preserves_norm_and_position_zero_is_identity():
    """RoPE is a rotation: it keeps every pair's norm, and position 0 leaves the vector unchanged."""
    x = torch.randn(2, 5, 3, 16)
    cos, sin = RotaryEmbedding(16)(torch.arange(5))
    y = apply_rope(x, cos, sin)
    pairs = lambda t: t.reshape(*t.shape[:-1], 8, 2).norm(dim=-1)
    torch.testing.assert_close(pairs(y), pairs(x))
    torch.testing.assert_close(y[:, 0], x[:, 0])


def test_yarn_v3_closed_form():
    """With d=64, L0=4096, beta 32/1: low 10, high 23, and rope_inv_freq equals the closed-form formula in fp64."""
    assert yarn_correction_range(64, 10000.0, 4096, 32, 1) == (10, 23)
    i = torch.arange(32, dtype=torch.float64)
    theta = 10000.0 ** (-2 * i / 64)
    ramp = ((i - 10) / 13).clamp(0, 1)
    expected = theta / 40 * ramp + theta * (1 - ramp)
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, YARN).double(), expected, rtol=1e-6, atol=0)
    # pairs 0..10 untouched, 23..31 divided by exactly the factor
    base = rope_inv_freq(64, 10000.0)
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, YARN)[:11], base[:11])
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, YARN)[23:], base[23:] / 40)


def test_v3_scales():
    """mscale(40, 1) = 1 + 0.1 ln 40; V3's MLA softmax scale is 192^-0.5 · mscale² = 0.135234; cos/sin factor 1."""
    assert yarn_get_mscale(40, 1.0) == pytest.approx(1 + 0.1 * math.log(40))
    assert yarn_get_mscale(1.0, 1.0) == 1.0
    v3 = get_preset("deepseek-v3")
    assert mla_softmax_scale(v3) == pytest.approx(0.135234, abs=1e-6)
    assert rope_attention_factor(v3.rope_scaling) == 1.0
    assert rope_attention_factor(None) == 1.0
    assert mla_softmax_scale(tiny_config()) == pytest.approx(24**-0.5)


def test_layout_helpers_are_inverse_permutations():
    """interleaved_to_half puts evens then odds; half_to_interleaved undoes it."""
    x = torch.arange(8.0)
    assert interleaved_to_half(x).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    y = torch.randn(3, 4, 12)
    torch.testing.assert_close(half_to_interleaved(interleaved_to_half(y)), y, rtol=0, atol=0)


@pytest.mark.parametrize("rs", [None, YARN, {**YARN, "mscale_all_dim": 0.0},
                                {**YARN, "factor": 8, "mscale": 0.707}], ids=["plain", "v3", "all_dim0", "f8"])
@pytest.mark.parametrize("d", [8, 64])
def test_matches_transformers(rs, d):
    """inv_freq, attention factor, cos/sin and the rotated tensors equal transformers' DeepseekV3RotaryEmbedding with
    apply_rotary_pos_emb_interleave and with the rotate_half path (fp32, atol 1e-5, positions up to 150K)."""
    cfg = tiny_config(qk_rope_head_dim=d, rope_scaling=rs,
                      max_position_embeddings=4096 * int(rs["factor"]) if rs else 4096)
    hf_rope = hf.DeepseekV3RotaryEmbedding(DeepseekV3Config(**cfg.to_hf()))
    ours = RotaryEmbedding.from_config(cfg)
    assert ours.dim == d
    assert ours.attention_factor == pytest.approx(hf_rope.attention_scaling, rel=1e-12)
    torch.testing.assert_close(ours.inv_freq, hf_rope.inv_freq, rtol=0, atol=0)
    pos = torch.cat([torch.arange(8), torch.randint(0, 150_000, (24,))])
    x = torch.randn(2, len(pos), 3, d)
    cos_hf, sin_hf = hf_rope(x, pos[None])
    cos, sin = ours(pos)
    torch.testing.assert_close(cos, cos_hf[0, :, : d // 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, sin_hf[0, :, : d // 2], atol=1e-5, rtol=0)
    y = interleaved_to_half(apply_rope(x, cos, sin)).transpose(1, 2)
    xt = x.transpose(1, 2)
    y_hf, _ = hf.apply_rotary_pos_emb_interleave(xt, xt, cos_hf, sin_hf)
    y_half, _ = hf.apply_rotary_pos_emb(interleaved_to_half(xt), xt, cos_hf, sin_hf)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(y, y_half, atol=1e-5, rtol=0)


def test_gqa_rotary_width():
    """from_config picks qk_rope_head_dim for MLA and head_dim for GQA."""
    assert RotaryEmbedding.from_config(tiny_config()).dim == 8
    assert RotaryEmbedding.from_config(tiny_config(attention="gqa", num_key_value_heads=2)).dim == 16


def test_dtype_and_batched_positions():
    """apply_rope returns the input dtype (computing in fp32) and accepts per-batch cos/sin (b, s, d/2)."""
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 5, 3, 16)
    cos, sin = rope(torch.arange(5))
    ref = apply_rope(x, cos, sin)
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16
    cb, sb = rope(torch.arange(5).expand(2, 5))
    torch.testing.assert_close(apply_rope(x, cb, sb), ref)
    cb2, sb2 = rope(torch.stack([torch.arange(5), torch.arange(5) + 3]))
    torch.testing.assert_close(apply_rope(x, cb2, sb2)[1], apply_rope(x[1:], *rope(torch.arange(3, 8)))[0])


def test_bad_shapes_raise():
    """Mismatched x / cos shapes or an odd dim raise ValueError with the shapes in the message."""
    cos, sin = RotaryEmbedding(16)(torch.arange(5))
    with pytest.raises(ValueError, match=r"got x \(2, 4, 3, 16\)"):
        apply_rope(torch.randn(2, 4, 3, 16), cos, sin)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(torch.randn(2, 5, 3, 8), cos, sin)
    with pytest.raises(ValueError, match="even"):
        rope_inv_freq(15)


def test_frequencies_stay_fp32_after_module_cast():
    """A model-wide `.to(torch.bfloat16)` casts buffers; the rotary tables must still come from fp32 frequencies."""
    ref = RotaryEmbedding(64, 10000.0, YARN)
    cast = RotaryEmbedding(64, 10000.0, YARN).to(torch.bfloat16)
    pos = torch.tensor([0, 5, 4095, 100_000])
    for a, b in zip(ref(pos), cast(pos)):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_fp32_rule_for_router_and_rotary_tables(tmp_path):
    """KeepsFP32 is the one rule: `model.to(bfloat16)` (and back to fp32, and `.half()`) casts the model but keeps every
    router weight and correction bias and the rotary inv_freq in fp32 with their values unchanged (no bf16 round
    trip); fp32_names lists exactly those tensors; from_pretrained(dtype=) and save_pretrained(dtype=) use the same
    rule."""
    from conftest import tiny_config
    from dsv3_min.hf import from_pretrained, save_pretrained
    from dsv3_min.model import DeepSeekV3
    from dsv3_min.rope import fp32_names

    cfg = tiny_config()
    m = DeepSeekV3(cfg)
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.weight.add_(1e-4)  # values bf16 cannot hold
            moe.gate.e_score_correction_bias.normal_(0, 1e-3)
    names = fp32_names(m)
    L = len(m.moe_layers())
    assert names == {"rotary.inv_freq"} | {n for n, _ in [*m.named_parameters(), *m.named_buffers()]
                                           if n.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))}
    assert len(names) == 1 + 2 * L
    before = {n: t.clone() for n, t in [*m.named_parameters(), *m.named_buffers()] if n in names}
    for cast in (lambda x: x.to(torch.bfloat16), lambda x: x.float(), lambda x: x.half()):
        cast(m)
        tensors = dict([*m.named_parameters(), *m.named_buffers()])
        assert m.embed_tokens.weight.dtype == cast(torch.zeros(1)).dtype
        for n, t in before.items():
            assert tensors[n].dtype == torch.float32 and torch.equal(tensors[n], t), n
    assert isinstance(m.mtp[0].mlp.gate.weight, torch.nn.Parameter)
    save_pretrained(m.float(), tmp_path, dtype=torch.bfloat16)
    from safetensors.torch import load_file
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert {k for k, t in on_disk.items() if t.dtype == torch.float32} == {
        k for k in on_disk if k.endswith(("mlp.gate.weight", "e_score_correction_bias"))}
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    tensors = dict([*loaded.named_parameters(), *loaded.named_buffers()])
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert all(tensors[n].dtype == torch.float32 and torch.equal(tensors[n], t) for n, t in before.items())

