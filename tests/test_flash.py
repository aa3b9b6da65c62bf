"""Tests for dsv3_min.flash: tiled PyTorch FlashAttention and the Triton kernel (interpreter on CPU, GPU if present)."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _interpreter import interpreter_run
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_min.attention import attend, check_attention_inputs
from dsv3_min.flash import TiledAttention, split_head_dim, tiled_attention_forward
from dsv3_min.flash_backend import flash_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _inputs(b, hq, hkv, sq, sk, dqk, dv, dtype=torch.float32, device="cpu", seed=0):
    """Random q, k, v (requiring grad) and an output gradient, (b, h, s, d) layout."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, sq, dqk, generator=g, device=device).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, sk, dqk, generator=g, device=device).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, sk, dv, generator=g, device=device).to(dtype).requires_grad_()
    do = torch.randn(b, hq, sq, dv, generator=g, device=device).to(dtype)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do, causal):
    """Output and (dq, dk, dv) of one attention implementation."""
    o = fn(q, k, v, causal)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _rel(x, ref):
    """‖x − ref‖ / ‖ref‖ (the absolute norm when ref is exactly zero: one key gives a constant softmax)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item() if ref.norm() > 0 else x.norm().item()


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), sq=st.integers(1, 40),
       extra=st.integers(0, 20), dqk=st.sampled_from([8, 24, 32]), dv=st.sampled_from([8, 12, 32]),
       causal=st.booleans(), block=st.sampled_from([4, 16, 128]))
def test_tiled_matches_eager_property(b, hkv, group, sq, extra, dqk, dv, causal, block):
    """The tiled PyTorch FlashAttention (forward and backward) equals eager fp32 attention to 1e-5 on any shape:
    ragged tiles, GQA, dqk != dv, causal with sq <= sk (bottom-right aligned), any tile size."""
    q, k, v, do = _inputs(b, hkv * group, hkv, sq, sq + extra, dqk, dv)

    def tiled(q, k, v, causal):
        return TiledAttention.apply(q, k, v, causal, dqk**-0.5, block, block)

    got, ref = _fwd_bwd(tiled, q, k, v, do, causal), _fwd_bwd(attend, q, k, v, do, causal)
    for x, r in zip(got, ref):
        torch.testing.assert_close(x, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("s", [1, 17, 130, 1000])
@pytest.mark.parametrize("causal", [True, False])
def test_tiled_ragged_lengths(s, causal):
    """Tiled forward+backward on the CPU path of `flash_attention` equals eager attention at lengths that are not
    tile multiples (1, 17, 130, 1000 with 128-row tiles), MLA head dims 24/16 and GQA 2 (relative error <= 1e-5)."""
    q, k, v, do = _inputs(1, 4, 2, s, s, 24, 16, seed=s)
    got = _fwd_bwd(lambda *a: flash_attention(*a, impl="torch"), q, k, v, do, causal)
    ref = _fwd_bwd(attend, q, k, v, do, causal)
    for x, r in zip(got, ref):
        assert _rel(x, r) <= 1e-5


def test_lse_is_logsumexp():
    """The tiled forward's log-sum-exp equals torch.logsumexp of the scaled, masked score rows."""
    q, k, v, _ = _inputs(1, 2, 2, 37, 50, 16, 16)
    _, lse = tiled_attention_forward(q, k, v, True, 0.25, 16, 16)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.25
    s = s.masked_fill(torch.ones(37, 50, dtype=torch.bool).triu(50 - 37 + 1), float("-inf"))
    torch.testing.assert_close(lse, s.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_split_head_dim():
    """Head dims are covered by power-of-two blocks of at least 32, split in two where that pads less
    (192 = 128 + 64 exactly, 80 = 64 + 32 instead of 128)."""
    assert split_head_dim(192) == (128, 64)
    assert split_head_dim(128) == (128, 0)
    assert split_head_dim(24) == (32, 0)
    assert split_head_dim(80) == (64, 32)
    assert split_head_dim(8) == (32, 0)
    assert split_head_dim(320) == (256, 64)


@pytest.mark.parametrize("shapes, causal, match", [
    (((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), True, "multiple"),
    (((1, 4, 9, 16), (1, 2, 8, 16), (1, 2, 8, 16)), True, "sq <= sk"),
    (((1, 4, 8, 16), (1, 2, 8, 8), (1, 2, 8, 16)), False, "expected k"),
    (((4, 8, 16),) * 3, False, "batch, heads, seq"),
])
def test_bad_inputs_raise(shapes, causal, match):
    """Mismatched heads, a causal query longer than the keys, head dims that disagree and wrong ranks raise
    ValueError naming the problem."""
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        check_attention_inputs(q, k, v, causal)
    with pytest.raises(ValueError):
        flash_attention(q, k, v, causal)


def test_unknown_impl_raises():
    """An unknown implementation name raises ValueError listing the valid ones; q, k, v of different dtypes too."""
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'triton', 'torch'\), got 'cuda-magic'"):
        flash_attention(q, q, q, impl="cuda-magic")
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q, q.double(), q)


def test_flash_attn_wrapper_layout(monkeypatch):
    """`flash_attn_package` converts (b, h, s, d) to flash_attn's (b, s, h, d) and back, passes causal and the scale,
    and pads a narrower V to the q/k width then slices the output (MLA 24/16 here). The `flash_attn` package is not
    installed anywhere we run, so a stand-in module computes `flash_attn_func` with eager attention in its layout:
    this checks our wrapper, not Tri Dao's kernels."""
    import types

    from dsv3_min.attention import flash_attn_package

    def flash_attn_func(q, k, v, causal=False, softmax_scale=None):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash_attn wants one head width"
        bhsd = [t.transpose(1, 2) for t in (q, k, v)]
        return attend(*bhsd, causal, softmax_scale).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    q, k, v, _ = _inputs(2, 4, 2, 9, 13, 24, 16)
    got = flash_attn_package(q, k, v, True, 0.3)
    torch.testing.assert_close(got, attend(q, k, v, True, 0.3))
    assert got.shape == (2, 4, 9, 16)


def test_flash_attn4_wrapper_takes_mla_widths_and_drops_the_lse(monkeypatch):
    """With FlashAttention-4 installed (`flash_attn.cute`), `flash_attn_package` prefers it over FlashAttention-2,
    passes MLA's unequal q/k and V widths unpadded, and returns the output of its `(out, lse)` pair. A stand-in
    module computes attention eagerly in FA4's layout (FA4 itself runs only on Hopper/Blackwell; measured on the H200
    in `results/attention_flash_attn.json`)."""
    import types

    from dsv3_min.attention import flash_attn_func, flash_attn_package

    calls = []

    def fa4(q, k, v, softmax_scale=None, causal=False):
        calls.append(v.shape[-1])
        bhsd = [t.transpose(1, 2) for t in (q, k, v)]
        o = attend(*bhsd, causal, softmax_scale).transpose(1, 2)
        return o, torch.zeros(o.shape[:-1])

    def fa2(*a, **kw):
        raise AssertionError("FlashAttention-2 must not be used when FlashAttention-4 is installed")

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fa2, __path__=[]))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", types.SimpleNamespace(flash_attn_func=fa4))
    assert flash_attn_func()[0] == "fa4"
    q, k, v, _ = _inputs(2, 4, 2, 9, 13, 24, 16)
    got = flash_attn_package(q, k, v, True, 0.3)
    torch.testing.assert_close(got, attend(q, k, v, True, 0.3))
    assert got.shape == (2, 4, 9, 16) and calls == [16]  # V went in at its own width: no padding


def test_imports_without_triton():
    """`import dsv3_min.flash_triton` works when triton cannot be imported, and flash_attention's CPU path still
    computes attention."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import dsv3_min.flash_triton as f
        assert not f.HAS_TRITON and not f.triton_available()
        q = torch.randn(1, 2, 5, 16)
        from dsv3_min.attention import attend
        from dsv3_min.flash_backend import flash_attention
        torch.testing.assert_close(flash_attention(q, q, q), attend(q, q, q))
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# The Triton kernel in Triton's CPU interpreter. TRITON_INTERPRET is read when the kernels are decorated (at import),
# so these cases run in one subprocess that sets it first. fp32 throughout (numpy has no bfloat16).
INTERPRETER_CASES = {  # name: (b, hq, hkv, sq, sk, dqk, dv, causal)
    "one_token": (1, 2, 1, 1, 1, 16, 16, True),
    "ragged_17_mla_tiny": (1, 2, 2, 17, 17, 24, 12, True),
    "ragged_130_gqa2": (1, 2, 1, 130, 130, 32, 32, True),
    "mla_192_128_gqa4_noncausal": (1, 4, 1, 40, 40, 192, 128, False),
    "decode_sq_lt_sk": (1, 2, 1, 17, 45, 24, 12, True),
    "noncausal_ragged": (1, 3, 3, 33, 33, 64, 48, False),
}

_INTERPRETER_SCRIPT = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
sys.path.insert(0, {tests!r})
from test_flash import INTERPRETER_CASES, _fwd_bwd, _inputs, _rel
from dsv3_min.attention import attend
from dsv3_min.flash_triton import TritonFlashAttention, INTERPRET
from dsv3_min.flash_backend import flash_attention
assert INTERPRET
out = {{}}
for name, (b, hq, hkv, sq, sk, dqk, dv, causal) in INTERPRETER_CASES.items():
    q, k, v, do = _inputs(b, hq, hkv, sq, sk, dqk, dv, seed=sq)
    got = _fwd_bwd(lambda q, k, v, c: TritonFlashAttention.apply(q, k, v, c, dqk ** -0.5), q, k, v, do, causal)
    ref = _fwd_bwd(attend, q, k, v, do, causal)
    out[name] = [_rel(x, r) for x, r in zip(got, ref)]
q, k, v, do = (t.transpose(1, 2).contiguous().transpose(1, 2).detach().requires_grad_(t.requires_grad)
               for t in _inputs(1, 4, 2, 37, 37, 24, 16))  # strided views, as rearranged from (b, s, h, d)
got = _fwd_bwd(lambda q, k, v, c: TritonFlashAttention.apply(q, k, v, c, 24 ** -0.5), q, k, v, do, True)
out["strided_bshd_views"] = [_rel(x, r) for x, r in zip(got, _fwd_bwd(attend, q, k, v, do, True))]
q, k, v, do = _inputs(1, 2, 1, 20, 20, 16, 16, dtype=torch.bfloat16)
o = flash_attention(q, k, v)  # bf16 through the interpreter: computed in fp32, returned in bf16
out["bf16_dtype"] = [str(o.dtype), _rel(o, attend(q.float(), k.float(), v.float()))]  # against fp32
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    """Run every interpreter case once, in a subprocess with TRITON_INTERPRET=1."""
    return interpreter_run(_INTERPRETER_SCRIPT.format(tests=os.path.dirname(__file__)))


@pytest.mark.parametrize("name", list(INTERPRETER_CASES))
def test_triton_kernel_in_interpreter(interpreter_results, name):
    """Our Triton kernel (forward, dq, dk, dv), run in Triton's CPU interpreter in fp32, equals eager fp32 attention
    to a relative error <= 1e-5 (measured: below 5e-7, fp32 rounding): one token, ragged tiles, GQA 1/2/4, dqk != dv
    (24/12, 192/128), causal with sq < sk, non-causal."""
    errs = interpreter_results[name]
    assert max(errs) <= 1e-5, dict(zip(("o", "dq", "dk", "dv"), errs))


def test_triton_kernel_strided_inputs(interpreter_results):
    """The kernel reads its inputs through their strides: (b, h, s, d) views of (b, s, h, d) memory (what a
    `rearrange` of projected heads gives) produce the same output and gradients (relative error <= 1e-5)."""
    assert max(interpreter_results["strided_bshd_views"]) <= 1e-5


def test_triton_interpreter_bf16_roundtrip(interpreter_results):
    """bf16 inputs through the interpreter path come back in bf16, within bf16 rounding of the fp32 reference
    (computed on the same bf16 inputs upcast): bf16 keeps 8 significant bits, so rounding the output costs at most
    2^-9 relative; we allow 2^-8 = 3.9e-3."""
    dtype, err = interpreter_results["bf16_dtype"]
    assert dtype == "torch.bfloat16" and err <= 2**-8, err


CUDA_CASES = [(2, 4, 2, s, s, 192, 128, c) for s in (1, 17, 130, 1000) for c in (True, False)] + [
    (1, 8, 1, 257, 257, 128, 128, True), (1, 8, 8, 300, 300, 64, 64, True), (2, 6, 3, 100, 233, 64, 64, True)]


@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("case", CUDA_CASES)
def test_triton_kernel_cuda_bf16(case):
    """On the GPU, the Triton kernel in bf16 (fp32 accumulation) matches fp32 eager attention: relative error <= 1e-2
    for the output and all three gradients."""
    b, hq, hkv, sq, sk, dqk, dv, causal = case
    q, k, v, do = _inputs(b, hq, hkv, sq, sk, dqk, dv, dtype=torch.bfloat16, device="cuda")
    got = _fwd_bwd(flash_attention, q, k, v, do, causal)
    ref = _fwd_bwd(attend, *(t.float().detach().requires_grad_() for t in (q, k, v)), do.float(), causal)
    for x, r in zip(got, ref):
        assert _rel(x, r) <= 1e-2


def test_attention_flops_matches_counted_matmul_flops():
    """`attention_flops` equals torch's FLOP counter on eager attention: the full square without `causal` (the causal
    count is half of it), and forward + backward = 3.5 forwards for dqk = dv: the eager backward's four matmuls plus
    the Q Kᵀ that the flash backward recomputes."""
    from torch.utils.flop_counter import FlopCounterMode

    from dsv3_min.flash import attention_flops
    b, h, s, d = 2, 3, 16, 8
    q, k, v, do = _inputs(b, h, h, s, s, d, d)
    with FlopCounterMode(display=False) as fwd:
        o = attend(q, k, v, causal=False)
    with FlopCounterMode(display=False) as bwd:
        o.backward(do)
    assert attention_flops(b, h, s, d, d, causal=False) == fwd.get_total_flops()
    assert attention_flops(b, h, s, d, d) == fwd.get_total_flops() / 2
    recompute = 2 * b * h * s * s * d
    assert attention_flops(b, h, s, d, d, causal=False, backward=True) == (
        fwd.get_total_flops() + bwd.get_total_flops() + recompute)
