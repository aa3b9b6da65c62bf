"""NF4 quantization (dsv3_min.quant): the levels, bit-equality with bitsandbytes, bits per parameter, QLoRA layer."""
import math
import os
import warnings

import pytest
import torch

from dsv3_min.lora import LoRALinear
from dsv3_min.quant import (
    NF4_LEVELS,
    NF4Linear,
    blockwise_scale,
    dynamic_codes,
    dynamic_levels_8bit,
    nf4_dequantize,
    nf4_quantize,
    pack_nibbles,
    unpack_nibbles,
)

warnings.filterwarnings("ignore", message=".*kernels.*")


def test_levels_are_normal_quantiles():
    """The 16 published NF4 levels equal the normal-quantile construction of QLoRA (δ = 0.9677083) to 1e-6."""
    pos = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(NF4_LEVELS.double(), v / v.abs().max(), atol=1e-6, rtol=0)
    assert NF4_LEVELS[7] == 0 and NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1


ODD_SHAPES = [((64, 256), torch.float32), ((33, 70), torch.bfloat16), ((5, 13), torch.float16), ((3, 7), torch.float32),
              ((129, 301), torch.float32), ((97, 331), torch.bfloat16), ((4, 80), torch.float16)]


def _bnb_reference(bnbf, w, double_quant):
    "bitsandbytes' quantization of `w` and its dequantization by bnb's own PyTorch formula (what its CUDA kernel does)."
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    packed, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    absmax = bnbf.dequantize_blockwise(st.absmax, st.state2) + st.offset if double_quant else st.absmax
    return packed, st, _dequantize_4bit_compute(packed.reshape(-1), absmax, NF4_LEVELS, 64, w.shape, w.dtype)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,dtype", ODD_SHAPES)
def test_nf4_bit_identical_to_bitsandbytes(shape, dtype, double_quant):
    """Random matrices of odd shapes (several second-level blocks for the larger ones), with and without double
    quantization: packed codes, absmax (fp32, or 8-bit codes + second-level scales + offset) and the dequantized
    tensor equal bitsandbytes' bit for bit (dequantized: bnb's PyTorch formula; its CPU `dequantize_4bit` kernel
    too wherever it is right, i.e. rows whose length is odd or a multiple of 64)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(shape[0])
    w = (torch.randn(shape) * 0.05).to(dtype)
    q = nf4_quantize(w, 64, double_quant=double_quant)
    packed, st, reference = _bnb_reference(bnbf, w, double_quant)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, st.absmax)
    if double_quant:
        assert torch.equal(q.offset, st.offset) and torch.equal(q.absmax2, st.state2.absmax)
        assert torch.equal(dynamic_levels_8bit(), st.state2.code)
    out = nf4_dequantize(q)
    assert out.dtype == dtype and out.shape == w.shape and torch.equal(out, reference)
    if shape[1] % 2 or shape[1] % 64 == 0:
        assert torch.equal(out, bnbf.dequantize_4bit(packed, st, quant_type="nf4"))


def test_dynamic_codes_equal_bitsandbytes_8bit_quantizer():
    """Our 8-bit rounding rule (nearest of 65,536 grid points, then its nearest level) gives bnb's CPU
    `quantize_blockwise` codes on all of 1M random values (the exact nearest level differs on 1,601 of them,
    notebook 35); absmax are equal."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(3)
    x = torch.randn(4096 * 256) * torch.rand(4096).repeat_interleave(256)
    codes, st = bnbf.quantize_blockwise(x, blocksize=256)
    scaled, absmax = blockwise_scale(x, 256)
    assert torch.equal(absmax, st.absmax)
    assert torch.equal(dynamic_codes(scaled), codes.long())


def test_bits_per_parameter():
    """Storage is 4 + 8/64 + 32/(64·256) bits per weight with double quant (≈4.127), 4 + 32/64 without."""
    w = torch.randn(1024, 4096)
    n = w.numel()
    assert nf4_quantize(w).bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-12)
    assert nf4_quantize(w, double_quant=False).bits_per_parameter == pytest.approx(4.5, abs=1e-12)
    assert abs(nf4_quantize(w).bits_per_parameter - 4.127) < 1e-3


def test_error_bound_and_nibbles():
    """Each dequantized value is within half the widest NF4 gap times its block absmax; nibble packing round-trips."""
    torch.manual_seed(3)
    w = torch.randn(128, 64)
    q = nf4_quantize(w, double_quant=False)
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    bound = q.absmax.repeat_interleave(64).reshape(w.shape) * half_gap
    assert ((nf4_dequantize(q) - w).abs() <= bound + 1e-7).all()
    codes = torch.randint(0, 16, (11,))
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), 11), codes.to(torch.uint8))
    assert pack_nibbles(torch.tensor([1, 2]))[0] == 0x12  # first element in the high nibble


def test_qlora_layer_trains_only_the_adapter():
    """LoRA on an NF4Linear: forward = dequantized W x + (α/r)BAx; only lora_A/B get gradients; codes never change."""
    torch.manual_seed(4)
    lin = torch.nn.Linear(128, 32)
    layer = LoRALinear(NF4Linear.from_linear(lin), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 128)
    w = nf4_dequantize(nf4_quantize(lin.weight))
    ref = x @ w.T + lin.bias + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=0)
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_A.weight", "lora_B.weight"]
    before = layer.base_layer.packed.clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    layer(x).square().sum().backward()
    opt.step()
    assert torch.equal(layer.base_layer.packed, before)
    assert layer.base_layer.n_quantized == 128 * 32 and math.isclose(layer.base_layer.quantized().bits_per_parameter,
                                                                     layer.base_layer.quantized().nbytes * 8 / 4096)


def test_bad_input_raises():
    """Integer tensors, odd block sizes and non-2-D weights for NF4Linear raise clear one-line errors."""
    with pytest.raises(ValueError, match="floating-point"):
        nf4_quantize(torch.arange(8))
    with pytest.raises(ValueError, match="block_size=7"):
        nf4_quantize(torch.randn(8), block_size=7)
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(nf4_quantize(torch.randn(4, 4, 4)))


def test_nf4_linear_keeps_no_dequantized_weight_for_backward():
    """NF4Linear's input gradient equals F.linear's on the dequantized weight, and autograd saves no (out, in) tensor
    between forward and backward (the weight is dequantized again in the backward)."""
    torch.manual_seed(5)
    layer = NF4Linear.from_linear(torch.nn.Linear(96, 40))
    x = torch.randn(3, 96, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (40, 96) not in saved and (96, 40) not in saved  # the weight, or its transpose
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, layer.weight, layer.bias).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=0)


def test_absurd_block_size_is_refused_at_once():
    """A block size beyond bitsandbytes' largest (4096), e.g. `--set quant_block_size=1000000000`, which padded every
    weight to 10**9 values (a hang), is refused in one line stating the limit, before any padding; `check_block_size`
    is the rule a config field uses (None for a valid size)."""
    import time

    from dsv3_min.quant import MAX_BLOCK_SIZE, check_block_size
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"block_size=1000000000: must be an even integer in \[2, 4096\]") as e:
        nf4_quantize(torch.randn(64, 64), block_size=10**9)
    assert time.perf_counter() - t0 < 1 and "\n" not in str(e.value)
    assert check_block_size(64) is None and check_block_size(MAX_BLOCK_SIZE) is None
    assert check_block_size(MAX_BLOCK_SIZE + 2) and check_block_size(7) and check_block_size(True)


# The fused Triton kernel (notebook 34) in Triton's CPU interpreter: TRITON_INTERPRET is read when the kernel is
# decorated (at import), so the cases run in one subprocess that sets it first.
_KERNEL_SCRIPT = """
import json, os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from dsv3_min.quant import nf4_dequantize, nf4_quantize
out = {}
torch.manual_seed(0)
for shape in [(1, 1), (7, 37), (3, 50), (129, 301), (97, 331)]:
    for dq in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            q = nf4_quantize((torch.randn(shape) * 0.05).to(dtype), 64, dq)
            got, ref = nf4_dequantize(q, impl="triton"), nf4_dequantize(q, impl="torch")
            out[f"{shape}-{dq}-{dtype}"] = [got.dtype == ref.dtype and got.shape == ref.shape, torch.equal(got, ref)]
print("RESULT" + json.dumps(out))
"""


def test_triton_kernel_equals_reference_in_interpreter():
    """The fused NF4 dequantization kernel, run in Triton's CPU interpreter, returns the PyTorch reference's tensor bit
    for bit (same dtype and shape) on odd shapes, with and without double quantization, for fp32 and bf16 weights."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert len(res) == 20 and all(a and b for a, b in res.values()), res


def test_unknown_impl_raises():
    """`nf4_dequantize(q, impl=...)` names the implementations it knows; 'triton' on CPU tensors without the
    interpreter raises instead of running somewhere else."""
    q = nf4_quantize(torch.randn(4, 64))
    with pytest.raises(ValueError, match="impl='cuda'"):
        nf4_dequantize(q, impl="cuda")
    if not os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            nf4_dequantize(q, impl="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_kernel_cuda_equals_reference(double_quant):
    """On the GPU the fused kernel (the 'auto' path for CUDA tensors) equals the PyTorch reference bit for bit for a
    bf16 weight of an odd shape, and NF4Linear's output and input gradient equal F.linear's on that weight."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    w = (torch.randn(333, 517, device="cuda") * 0.05).to(torch.bfloat16)
    q = nf4_quantize(w, 64, double_quant)
    assert torch.equal(nf4_dequantize(q), nf4_dequantize(q, impl="torch"))
    layer = NF4Linear(q)
    x = torch.randn(4, 517, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, nf4_dequantize(q, impl="torch"))
    y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
