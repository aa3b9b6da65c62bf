"""FP8 with DeepSeek-V3's fine-grained scaling (notebook 22) on CPU: quantization bounds, the emulated GEMM against
float64, Float8Linear's gradients, the convert transform's exclusions, and a training run with `fp8=True`."""
import math

import pytest
import torch
from _tiny_run import losses, tiny_corpus_fixture, train_argv  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import tiny_config
from dsv3_min import fp8
from dsv3_min.__main__ import main
from dsv3_min.hf import latest_checkpoint
from dsv3_min.model import DeepSeekV3
from dsv3_min.moe import Experts, Router


def _wide_range(rows: int, cols: int, seed: int) -> torch.Tensor:
    "Signed values whose magnitudes span 2^-20 .. 2^20 (log-uniform), a few exact zeros."
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(rows, cols, generator=g) * 40 - 20)
    x = mag * torch.sign(torch.randn(rows, cols, generator=g))
    x[torch.rand(rows, cols, generator=g) < 0.02] = 0.0
    return x


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), block=st.sampled_from([1, 128]), seed=st.integers(0, 99))
def test_quantize_round_trip_is_within_e4m3_error_bound_per_element(rows, cols, block, seed):
    """Each element comes back within half an E4M3 step: 2^-4 |x| where x/s is normal (>= 2^-6), 2^-10 s in the
    subnormal range; scales are powers of two, |q| <= 448, the block's largest element keeps its 2^-4 bound."""
    x = _wide_range(rows, cols, seed)
    t = fp8.quantize(x, rows=block)
    s = fp8.scales_full(t)[:rows, :cols]
    assert torch.equal(torch.exp2(torch.log2(t.scale).round()), t.scale)  # powers of two
    assert t.q.float().abs().max() <= 448
    err = (fp8.dequantize(t) - x).abs()
    normal = x.abs() / s >= 2.0**-6
    assert (err[normal] <= 2.0**-4 * x.abs()[normal]).all()
    assert (err[~normal] <= 2.0**-10 * s[~normal]).all()


def test_pow2_scale_puts_the_largest_element_in_the_top_binade():
    """The scale is the smallest power of two with amax/s <= 448: amax/s lies in (224, 448] (exactly 448 at a power)."""
    amax = torch.tensor([448.0, 449.0, 1.0, 3.0e-30, 7.0e20, 0.0])
    s = fp8.pow2_scale(amax)
    r = (amax / s)[:-1]
    assert ((r > 224) & (r <= 448)).all() and s[-1] == 1.0 and s[0] == 1.0


def test_emulated_fp8_gemm_equals_float64_product_of_dequantized_inputs():
    """`emulated_mm` (FP32 sums per 128-chunk of K, promoted to FP32) equals the float64 product of the dequantized
    operands to FP32 rounding (measured ~6e-8 relative; tolerance 1e-6), for both B granularities and ragged shapes."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(130, 700, generator=g) * torch.rand(1, 700, generator=g).pow(3) * 50
    for rows, n in ((128, 200), (1, 70)):
        b = torch.randn(n, 700, generator=g)
        qa, qb = fp8.quantize(a), fp8.quantize(b, rows=rows)
        ref = fp8.dequantize(qa).double() @ fp8.dequantize(qb).double().T
        out = fp8.emulated_mm(qa, qb, torch.float32).double()
        assert out.shape == (130, n)
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_float8_linear_gradients_equal_the_fp8_gemms_of_quantized_operands():
    """Float8Linear's output, dX and dW are the float64 products of DeepSeek-V3's quantized operands: X (1x128) W
    (128x128)ᵀ, dY (1x128 along N) W, dYᵀ (1x128 along tokens) X (1x128 along tokens) (measured 5e-8; bound 5e-7)."""
    torch.manual_seed(0)
    lin = nn.Linear(200, 150, bias=False)
    layer = fp8.Float8Linear(lin)
    x = torch.randn(3, 70, 200, requires_grad=True)
    gy = torch.randn(3, 70, 150)
    y = layer(x)
    y.backward(gy)
    x2, g2 = x.detach().reshape(-1, 200), gy.reshape(-1, 150)
    dq = lambda t, rows=1: fp8.dequantize(fp8.quantize(t, rows)).double()  # noqa: E731
    wq = dq(lin.weight.detach(), 128)
    for got, ref in ((y.reshape(-1, 150), dq(x2) @ wq.T), (x.grad.reshape(-1, 200), dq(g2) @ wq),
                     (lin.weight.grad, (dq(g2.T.contiguous()) @ dq(x2.T.contiguous()).T))):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 5e-7


def test_float8_linear_is_close_to_the_full_precision_linear_forward_and_backward():
    """Against autograd of the fp32 layer, FP8's output and gradients differ by E4M3's rounding only: the relative
    Frobenius error (measured 0.026-0.042) is bounded at 0.1, twice the ~0.05 that rounding both operands of a product
    to a 2^-4 half-step gives (sqrt(2/3)·2^-4), and it is not zero (the GEMMs do run in FP8)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 192)
    layer = fp8.Float8Linear(lin)
    x = torch.randn(2, 130, 256, requires_grad=True)
    grads = []
    for m in (layer, lin):
        y = m(x)
        grads.append((y, *torch.autograd.grad(y.square().sum(), (x, lin.weight, lin.bias))))
    for got, ref in zip(*grads):  # y, dX, dW, db
        assert 1e-3 < ((got - ref).norm() / ref.norm()).item() < 0.1


def test_convert_swaps_projections_and_experts_and_keeps_the_exclusions():
    """convert() replaces modules, never methods: every nn.Linear but lm_head becomes Float8Linear and Experts become
    Float8Experts; embedding, lm_head, the router, norms keep their types; parameters are the same objects."""
    model = DeepSeekV3(tiny_config())
    params = dict(model.named_parameters())
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    fp8.convert(model)
    mods = dict(model.named_modules())
    assert all(type(mods[n]) is fp8.Float8Linear for n in linears if n != "lm_head")
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    assert any(type(m) is fp8.Float8Experts for m in mods.values()) and not any(type(m) is Experts for m in mods.values())
    assert any(type(m) is Router for m in mods.values())
    assert {n for n, m in mods.items() if "norm" in type(m).__name__.lower()} == \
        {n for n, m in DeepSeekV3(tiny_config()).named_modules() if "norm" in type(m).__name__.lower()}
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not any("forward" in vars(m) for m in mods.values())


def test_float8_experts_match_the_bf16_experts_to_fp8_accuracy_and_train_both_matrices():
    """Float8Experts (same weights) agrees with Experts to E4M3 accuracy (two FP8 GEMMs in a row: measured 0.063
    relative, bound 0.15) and sends gradients to both stacked weights."""
    cfg = tiny_config(hidden_size=128, moe_intermediate_size=128)
    ref = Experts(cfg)
    f8 = fp8.Float8Experts(ref)
    x = torch.randn(40, 128)
    w = torch.rand(40, 2)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts)[:2] for _ in range(40)])
    y8, y = f8(x, w, idx), ref(x, w, idx)
    assert ((y8 - y).norm() / y.norm()).item() < 0.15
    y8.square().sum().backward()
    assert ref.gate_up_proj.grad.abs().sum() > 0 and ref.down_proj.grad.abs().sum() > 0


def test_train_with_fp8_true_converts_the_model_and_tracks_the_fp32_losses(tiny_corpus, tmp_path):
    """`train --set fp8=true` (emulated FP8 on CPU) trains the converted model: finite losses that differ from the
    FP32 run's (the GEMMs really are FP8) by E4M3 rounding only (measured < 0.5% per step; bound 2%), and a
    checkpoint with the usual parameter names that loads into a plain model."""
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"fp8_{flag}"
        assert main(train_argv(tiny_corpus, "--out", str(out), "--max-steps", "4", "--set", f"fp8={flag}")) == 0
        runs[flag] = [loss for _, loss in losses(out)]
    assert all(math.isfinite(v) for v in runs["true"]) and runs["true"] != runs["false"]
    assert max(abs(a - b) / b for a, b in zip(runs["true"], runs["false"])) < 0.02
    assert latest_checkpoint(tmp_path / "fp8_true") is not None


@pytest.mark.parametrize("rows", [1, 128])
def test_quantize_pads_to_multiples_of_128_and_keeps_the_logical_shape(rows):
    """q and scales are padded (zeros) to whole blocks; `shape` and `dequantize` give back the logical size."""
    t = fp8.quantize(torch.randn(130, 260), rows=rows)
    assert t.q.shape == ((256 if rows == 128 else 130), 384) and t.shape == (130, 260)
    assert t.scale.shape == ((2 if rows == 128 else 130), 3) and fp8.dequantize(t).shape == (130, 260)


def test_tile_scaling_keeps_the_small_values_that_per_tensor_scaling_flushes_next_to_outliers():
    """With two outlier channels (x1000) in normal activations, one per-tensor scale flushes 8x more elements to zero
    than 1x128 tiles (measured 0.65% vs 0.076%) and has a larger mean per-element error (measured 0.036 vs 0.024)."""
    x = torch.randn(256, 512)
    x[:, :2] *= 1000
    e = fp8.scaling_errors(x)
    assert e["per_tensor_zero_frac"] > 4 * e["tile_zero_frac"]
    assert e["per_tensor_elem_rel_err"] > 1.2 * e["tile_elem_rel_err"]
