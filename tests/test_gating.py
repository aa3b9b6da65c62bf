"""Tests for dsv3_min.gating: SwiGLU parity with transformers, HeadGate formula, shapes and errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

from conftest import tiny_config
from dsv3_min.gating import HeadGate, SwiGLU


def test_swiglu_matches_transformers():
    """SwiGLU loads DeepseekV3MLP's state dict one to one and gives the same output exactly (fp32)."""
    cfg = tiny_config()
    ref = DeepseekV3MLP(DeepseekV3Config(**cfg.to_hf()), intermediate_size=cfg.moe_intermediate_size)
    ours = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 9, cfg.hidden_size)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


def test_swiglu_no_bias_and_bad_shape():
    """SwiGLU has exactly the three bias-free weights and rejects a wrong hidden size with ValueError."""
    m = SwiGLU(16, 24)
    assert sorted(k for k, _ in m.named_parameters()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    with pytest.raises(ValueError, match="expected last dim 16"):
        m(torch.randn(2, 3, 15))


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 6), h=st.integers(1, 4), e=st.integers(1, 8), d=st.integers(1, 16))
def test_headgate_formula(b, s, h, e, d):
    """HeadGate(x, o) == o * sigmoid(x @ W.T) viewed per head, for arbitrary sizes; gates lie strictly in (0, 1)."""
    g = HeadGate(d, h, e, init_std=1.0)
    x, o = torch.randn(b, s, d), torch.randn(b, s, h, e)
    gates = torch.sigmoid(x @ g.weight.T).view(b, s, h, e)
    torch.testing.assert_close(g(x, o), o * gates)
    assert torch.all((g.scores(x) > 0) & (g.scores(x) < 1))


def test_headgate_is_query_dependent_and_head_specific():
    """Different tokens and different heads get different gate values (the gate is not a constant per head)."""
    g = HeadGate(32, 4, 8, init_std=0.5)
    sc = g.scores(torch.randn(1, 5, 32))
    assert sc[0, 0].sub(sc[0, 1]).abs().max() > 1e-3  # two tokens
    assert sc[0, 0, 0].sub(sc[0, 0, 1]).abs().max() > 1e-3  # two heads


def test_headgate_init_near_half():
    """The documented init N(0, 0.02^2) starts every gate near sigmoid(0) = 0.5."""
    g = HeadGate(64, 4, 16)
    assert g.weight.shape == (64, 64)
    assert g.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert (g.scores(torch.randn(2, 8, 64)) - 0.5).abs().max() < 0.15


def test_headgate_bad_shapes_raise():
    """Wrong x or o shapes raise ValueError stating expected and actual shapes."""
    g = HeadGate(16, 2, 4)
    with pytest.raises(ValueError, match=r"expected o of shape \(1, 3, 2, 4\)"):
        g(torch.randn(1, 3, 16), torch.randn(1, 3, 2, 5))
    with pytest.raises(ValueError, match="expected x"):
        g(torch.randn(1, 3, 15), torch.randn(1, 3, 2, 4))
