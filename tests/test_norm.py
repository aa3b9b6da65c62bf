"""Tests for dsv3_min.norm: RMSNorm parity with transformers, DeepNorm constants, deepnorm_init_ (the blocks
that place the norms, pre-norm and DeepNorm, are tested in test_model.py)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

from conftest import tiny_config
from dsv3_min.norm import RMSNorm, deepnorm_alpha, deepnorm_beta, deepnorm_init_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [48, 513, 7168])
def test_rmsnorm_matches_transformers(dtype, dim):
    """RMSNorm (torch's F.rms_norm on the fp32 upcast) with a random gain equals transformers' hand-written
    DeepseekV3RMSNorm bit for bit, in fp32, bf16 and fp16, for small, odd and DeepSeek-V3-sized widths."""
    ours, ref = RMSNorm(dim, eps=1e-6), DeepseekV3RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(3, 7, dim) * 5).to(dtype)
    torch.testing.assert_close(ours.to(dtype)(x), ref.to(dtype)(x), atol=0, rtol=0)


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(1e-3, 1e3), d=st.integers(2, 64))
def test_rmsnorm_unit_rms_and_scale_invariance(scale, d):
    """(fp32) With unit gain, every output row has RMS 1 and the output does not depend on the input's scale."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(4, d, generator=g)
    norm = RMSNorm(d, eps=0.0)
    y = norm(x)
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(4))
    torch.testing.assert_close(norm(x * scale), y)


def test_rmsnorm_bad_shape_raises():
    """A last dimension that does not match the gain raises ValueError stating both shapes."""
    with pytest.raises(ValueError, match="expected last dim 8"):
        RMSNorm(8)(torch.randn(2, 7))


def test_deepnorm_constants():
    """alpha=(2N)^(1/4), beta=(8N)^(-1/4) (DeepNet, decoder-only); N<1 is rejected."""
    assert deepnorm_alpha(8) == pytest.approx(2.0)
    assert deepnorm_beta(2) == pytest.approx(0.5)
    assert deepnorm_alpha(61) == pytest.approx(122 ** 0.25)
    with pytest.raises(ValueError):
        deepnorm_alpha(0)


def test_bad_norm_scheme_raises():
    """An unknown norm scheme is rejected by ModelConfig with a ValueError naming the field."""
    with pytest.raises(ValueError, match="norm_scheme"):
        tiny_config(norm_scheme="postnorm")


def test_deepnorm_init_gains():
    """deepnorm_init_ gives value/output/FFN weights (incl. stacked experts and MLA's value rows) std beta*xavier,
    and queries/keys std 1*xavier, and leaves other parameters untouched."""
    torch.manual_seed(0)
    H, dn, dv, r, d, inter, E = 4, 32, 32, 64, 256, 128, 6

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * inter, d))
            self.down_proj = nn.Parameter(torch.zeros(E, d, inter))

    m = nn.ModuleDict(dict(q_proj=nn.Linear(d, d, bias=False), v_proj=nn.Linear(d, d, bias=False),
                           o_proj=nn.Linear(d, d, bias=True), kv_b_proj=nn.Linear(r, H * (dn + dv), bias=False),
                           up_proj=nn.Linear(d, inter, bias=False), router=nn.Linear(d, E, bias=False),
                           experts=Experts()))
    with torch.no_grad():
        m["router"].weight.fill_(0.123)
    beta = deepnorm_beta(48)
    deepnorm_init_(m, beta, cfg=tiny_config(num_attention_heads=H, qk_nope_head_dim=dn, v_head_dim=dv))
    xs = lambda fi, fo: math.sqrt(2 / (fi + fo))
    approx = lambda t, v: pytest.approx(v, rel=0.05)
    assert m["q_proj"].weight.std().item() == approx(None, xs(d, d))
    assert m["v_proj"].weight.std().item() == approx(None, beta * xs(d, d))
    assert m["o_proj"].weight.std().item() == approx(None, beta * xs(d, d))
    assert torch.all(m["o_proj"].bias == 0)
    assert m["up_proj"].weight.std().item() == approx(None, beta * xs(d, inter))
    kvb = m["kv_b_proj"].weight.view(H, dn + dv, r)
    assert kvb[:, :dn].std().item() == approx(None, xs(r, H * (dn + dv)))
    assert kvb[:, dn:].std().item() == approx(None, beta * xs(r, H * (dn + dv)))
    assert m["experts"].gate_up_proj.std().item() == approx(None, beta * xs(d, inter))
    assert m["experts"].down_proj.std().item() == approx(None, beta * xs(inter, d))
    assert torch.all(m["router"].weight == 0.123)


def test_deepnorm_init_needs_head_sizes_for_kv_b_proj():
    """Without a cfg, a kv_b_proj cannot be split into key and value rows: ValueError."""
    with pytest.raises(ValueError, match="kv_b_proj"):
        deepnorm_init_(nn.ModuleDict(dict(kv_b_proj=nn.Linear(8, 8))), 0.5)


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_deepnorm_init_on_real_attention_and_moe(attention):
    """On the package's own attention (MLA or GQA) and MoE modules, deepnorm_init_ scales exactly the value/output and
    FFN weights by beta (MLA: the value rows of kv_b_proj), leaves queries/keys at gain 1 and the router untouched."""
    from dsv3_min.attention import GroupedQueryAttention
    from dsv3_min.mla import MultiHeadLatentAttention
    from dsv3_min.moe import MoE

    cfg = tiny_config(attention=attention, hidden_size=128, num_attention_heads=8, num_key_value_heads=8,
                      qk_nope_head_dim=32, v_head_dim=32, kv_lora_rank=64, moe_intermediate_size=128)
    attn = (MultiHeadLatentAttention if attention == "mla" else GroupedQueryAttention)(cfg, 0)
    block = nn.ModuleDict(dict(self_attn=attn, mlp=MoE(cfg)))
    router = block["mlp"].gate.weight.detach().clone()
    beta = deepnorm_beta(100)
    deepnorm_init_(block, beta)
    xs = lambda w: math.sqrt(2 / (w.shape[-1] + w.shape[-2]))
    rel = lambda w, gain: w.std().item() / (gain * xs(w))
    o = attn.o_proj.weight
    assert rel(o, beta) == pytest.approx(1, abs=0.1)
    if attention == "mla":
        kvb = attn.kv_b_proj.weight.view(8, 64, 64)
        full = math.sqrt(2 / (64 + 8 * 64))
        assert kvb[:, 32:].std().item() / (beta * full) == pytest.approx(1, abs=0.1)
        assert kvb[:, :32].std().item() / full == pytest.approx(1, abs=0.1)
        assert rel(attn.q_b_proj.weight, 1.0) == pytest.approx(1, abs=0.1)
    else:
        assert rel(attn.v_proj.weight, beta) == pytest.approx(1, abs=0.1)
        assert rel(attn.q_proj.weight, 1.0) == pytest.approx(1, abs=0.1)
        assert rel(attn.k_proj.weight, 1.0) == pytest.approx(1, abs=0.1)
    ex = block["mlp"].experts
    assert ex.gate_up_proj.std().item() / (beta * math.sqrt(2 / (128 + 128))) == pytest.approx(1, abs=0.1)
    assert rel(block["mlp"].shared_experts.down_proj.weight, beta) == pytest.approx(1, abs=0.1)
    assert torch.equal(block["mlp"].gate.weight, router)
