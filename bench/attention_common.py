"""What bench/attention.py's timings share: the inputs, every attention method, the timing (triton's do_bench), the
FLOP count (`dsv3_min.flash.attention_flops`, notebook 12) and the printed table. Needs a CUDA GPU."""
import time

import torch
import torch.nn.functional as F

from dsv3_min.attention import attend, flash_attn_func, flash_attn_package
from dsv3_min.flash import FWD_BWD_FLOPS, attention_flops
from dsv3_min.flash_triton import TritonFlashAttention

HEADS = 16
TOKENS = 16 * 1024  # batch × seq held constant
SHAPES = {"mla_192_128": (192, 128), "mha_128_128": (128, 128)}
FLEX_SEQS = (4096,)  # each length costs a torch.compile of forward and backward
T0 = time.time()


def log(*a):
    """Print with the elapsed time, flushed (the device returns only the tail of the output)."""
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel_err(x, ref):
    """‖x − ref‖ / ‖ref‖ in fp64 (NaN or inf anywhere gives inf)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def case_inputs(b, hq, hkv, sq, sk, dqk, dv, dt, seed):
    """Fresh random q, k, v (requiring grad) and dO of a correctness case, (b, h, s, d), in dtype `dt`."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, sq, dqk, device="cuda", generator=g).to(dt).requires_grad_()
    k = torch.randn(b, hkv, sk, dqk, device="cuda", generator=g).to(dt).requires_grad_()
    v = torch.randn(b, hkv, sk, dv, device="cuda", generator=g).to(dt).requires_grad_()
    return q, k, v, torch.randn(b, hq, sq, dv, device="cuda", generator=g).to(dt)


def errors_vs_eager(fn, q, k, v, do, causal, before=None):
    """Relative errors of `fn(q, k, v)` and its (dq, dk, dv) against fp32 eager attention (`before()` runs between)."""
    ref = attend(q.float(), k.float(), v.float(), causal)  # the reference: eager, fp32
    ref_g = torch.autograd.grad(ref, (q, k, v), do.float())
    if before is not None:
        before()
    o = fn(q, k, v)
    grads = torch.autograd.grad(o, (q, k, v), do)
    # a gradient that is exactly zero (one key: softmax is constant) is compared by its largest absolute value
    return [rel_err(o, ref)] + [rel_err(x, r) if r.abs().max() > 0 else x.abs().max().item()
                                for x, r in zip(grads, ref_g)]


def bench_ms(fn, grads=()):
    """Median milliseconds of fn(): `triton.testing.do_bench` (CUDA events, L2 flushed between runs; no timing loop of
    our own)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median")


def make_inputs(b, s, dqk, dv, seed=0):
    """bf16 q, k, v (requiring grad) and a gradient dO, all (b, h, s, d)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda d: torch.randn(b, HEADS, s, d, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(dqk).requires_grad_(), mk(dqk).requires_grad_(), mk(dv).requires_grad_()
    return q, k, v, mk(dv)


def methods(dqk, dv, cfg):
    """name -> fn(q, k, v) returning (b, h, s, dv); every method computes the same causal attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend, pad_v=False):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                if pad_v and v.shape[-1] != q.shape[-1]:  # flash needs equal head dims: pad V, slice O (cost included)
                    o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - v.shape[-1])), is_causal=True)
                    return o[..., : v.shape[-1]]
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fn

    def naive(q, k, v):  # as transformers' eager path: bf16 matmuls, fp32 softmax, S x S materialised
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        p = s.masked_fill(mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
        return p @ v

    ms = {"ours (Triton)": lambda q, k, v: TritonFlashAttention.apply(q, k, v, True, dqk**-0.5, cfg),
          "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION),
          "SDPA flash" + (" (V padded)" if dqk != dv else ""): sdpa(SDPBackend.FLASH_ATTENTION, pad_v=True),
          "SDPA mem-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    try:
        ms[f"flash_attn package ({flash_attn_func()[0]})"] = lambda q, k, v: flash_attn_package(q, k, v, True)
    except ImportError:
        pass
    ms["flex_attention"] = "flex"
    ms["naive (eager)"] = naive
    return ms


def flex_fn(s):
    """A compiled flex_attention with a causal block mask for sequence length s."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, s, s, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def time_method(fn, q, k, v, do, flops):
    """Forward and forward+backward median ms and TFLOP/s of one method on the given inputs."""
    ms_f = bench_ms(lambda: fn(q, k, v))
    ms_fb = bench_ms(lambda: fn(q, k, v).backward(do), grads=(q, k, v))
    return dict(ms_fwd=ms_f, ms_fwdbwd=ms_fb, tflops_fwd=flops / ms_f / 1e9, tflops_fwdbwd=FWD_BWD_FLOPS * flops / ms_fb / 1e9)


def bench_point(name, dqk, dv, s, cfg, budget_s):
    """Every method at one (head shape, seq): same inputs, outputs checked against ours."""
    b = TOKENS // s
    q, k, v, do = make_inputs(b, s, dqk, dv, seed=s)
    f = attention_flops(b, HEADS, s, dqk, dv)
    ref, rows = None, []
    for mname, fn in methods(dqk, dv, cfg).items():
        row = dict(shape=name, dqk=dqk, dv=dv, seq=s, batch=b, heads=HEADS, method=mname)
        rows.append(row)
        if time.time() - T0 > budget_s:
            row["skipped"] = "time budget"
            continue
        if fn == "flex" and (s not in FLEX_SEQS or time.time() - T0 > 0.6 * budget_s):
            row["skipped"] = "flex_attention compiles per length: timed at some lengths only"
            continue
        try:
            fn = flex_fn(s) if fn == "flex" else fn
            o = fn(q, k, v).detach().float()
            ref = o if ref is None else ref  # ours comes first: every other method is checked against it
            row["rel_err_vs_ours"] = rel_err(o, ref)
            del o
            row.update(time_method(fn, q, k, v, do, f))
        except Exception as e:  # rejected shapes, out of memory
            row["error"] = repr(e)[:300]
        torch.cuda.empty_cache()
        log(f"{name} S={s:5d} {mname:24s}", {k_: (round(v_, 3) if isinstance(v_, float) else v_)
                                              for k_, v_ in row.items() if k_ not in ("shape", "method")})
    return rows


def table(out):
    """The short table printed last: TFLOP/s fwd / fwd+bwd per method at each (shape, seq)."""
    lines = []
    for name in SHAPES:
        rows = [x for x in out["bench"] if x["shape"] == name]
        seqs = sorted({x["seq"] for x in rows})
        lines.append(f"{name}  TFLOP/s fwd/fwd+bwd  " + "  ".join(f"S={s:>5d}" for s in seqs))
        for m in dict.fromkeys(x["method"] for x in rows):
            cells = []
            for s in seqs:
                x = next((x for x in rows if x["method"] == m and x["seq"] == s), {})
                cells.append(f"{x['tflops_fwd']:3.0f}/{x['tflops_fwdbwd']:3.0f}" if "tflops_fwd" in x else "   -   ")
            lines.append(f"  {m:26s}" + "  ".join(f"{c:>7s}" for c in cells))
    return "\n".join(lines)
