"""Attention kernels on one GPU: correctness of our Triton FlashAttention-2, then forward and forward+backward
TFLOP/s against PyTorch's SDPA backends, flex_attention and the naive path, at two head shapes.

    python bench/attention.py [--quick] [--out DIR]
    python bench/attention.py --package [--out DIR]   # the flash_attn package (FlashAttention-4 or 2) only


Writes DIR/attention_bench.json and DIR/attention_bench.png (DIR defaults to $OUT, else results/) and prints a
short table last. Needs a CUDA GPU and triton.

FLOP count (the convention recorded in docs/reference.md): a causal forward does two matmuls over half of the
S x S square, Q Kᵀ (2·dqk FLOP per pair) and P V (2·dv per pair), so
    forward  = 2 · B·H·(S²/2) · (dqk + dv) = B·H·S²·(dqk + dv)
    fwd+bwd  = 3.5 × forward   (the backward counted as 2.5 forwards: dV, dP, dQ, dK plus the Q Kᵀ recompute;
                                exact for dqk = dv, 4% under the true count (3·dqk + 2·dv) at 192/128)
Every method is timed on the same inputs with the same formula, so the ratios are exact whatever the convention.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3_min.attention import attend, flash_attn_func, flash_attn_package
from dsv3_min.flash import FlashConfig, Tiles, default_config
from dsv3_min.flash_backend import flash_attention
from dsv3_min.flash_triton import TritonFlashAttention, triton_flash_backward, triton_flash_forward

HEADS = 16
TOKENS = 16 * 1024  # batch × seq held constant
SHAPES = {"mla_192_128": (192, 128), "mha_128_128": (128, 128)}
FLEX_SEQS = (4096,)  # each length costs a torch.compile of forward and backward
T0 = time.time()


def log(*a):
    """Print with the elapsed time, flushed (the device returns only the tail of the output)."""
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def flops_fwd(b, h, s, dqk, dv):
    """Causal forward FLOPs, B·H·S²·(dqk + dv) (see the module docstring)."""
    return b * h * s * s * (dqk + dv)


def rel_err(x, ref):
    """‖x − ref‖ / ‖ref‖ in fp64 (NaN or inf anywhere gives inf)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison():
    """Fill freed allocator memory with NaN, so an output element the kernel forgets to write shows up as NaN."""
    free = torch.cuda.mem_get_info()[0]
    t = torch.full((min(free // 4, 2 << 30) // 4,), float("nan"), device="cuda")
    del t


def check_case(b, hq, hkv, sq, sk, dqk, dv, causal, dt, seed, cfg=None):
    """One case: our kernel (default tiles, or `cfg`) vs fp32 eager attention on fresh random inputs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, sq, dqk, device="cuda", generator=g).to(dt).requires_grad_()
    k = torch.randn(b, hkv, sk, dqk, device="cuda", generator=g).to(dt).requires_grad_()
    v = torch.randn(b, hkv, sk, dv, device="cuda", generator=g).to(dt).requires_grad_()
    do = torch.randn(b, hq, sq, dv, device="cuda", generator=g).to(dt)
    ref = attend(q.float(), k.float(), v.float(), causal)  # the reference: eager, fp32
    ref_g = torch.autograd.grad(ref, (q, k, v), do.float())
    poison()
    o = flash_attention(q, k, v, causal) if cfg is None else TritonFlashAttention.apply(q, k, v, causal, dqk**-0.5, cfg)
    grads = torch.autograd.grad(o, (q, k, v), do)
    # a gradient that is exactly zero (one key: softmax is constant) is compared by its largest absolute value
    errs = [rel_err(o, ref)] + [rel_err(x, r) if r.abs().max() > 0 else x.abs().max().item()
                                for x, r in zip(grads, ref_g)]
    tol = 1e-5 if dt == torch.float32 else 1e-2  # fp32 ("ieee" dots) measured 4.1e-7 on the H200
    row = dict(b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, dqk=dqk, dv=dv, causal=causal, dtype=str(dt).split(".")[-1],
               tiles="default" if cfg is None else "swept", err_o=errs[0], err_dq=errs[1], err_dk=errs[2],
               err_dv=errs[3], tol=tol, ok=max(errs) <= tol)
    log("check", {k_: (f"{v_:.2e}" if isinstance(v_, float) else v_) for k_, v_ in row.items()})
    return row


def check_correctness(out, quick, path=None):
    """Our kernel vs fp32 eager attention: ragged lengths, GQA ratios, dqk != dv, causal or not, three dtypes."""
    cases = [(2, 4, 2, s, s, 192, 128, causal, torch.bfloat16) for s in (1, 17, 130, 1000) for causal in (True, False)]
    cases += [(1, 8, 1, 257, 257, 128, 128, True, torch.bfloat16), (1, 8, 8, 300, 300, 64, 64, True, torch.bfloat16),
              (1, 4, 4, 2048, 2048, 192, 128, True, torch.bfloat16), (1, 4, 2, 333, 333, 192, 128, True, torch.float16),
              (1, 2, 1, 129, 129, 96, 80, False, torch.float32), (2, 6, 3, 100, 233, 64, 64, True, torch.bfloat16),
              (2, 6, 3, 100, 233, 24, 12, True, torch.bfloat16)]
    cases = cases[::3] if quick else cases
    out["correctness"] = []
    for i, c in enumerate(cases):  # saved after each case, so a crash still leaves the cases before it
        out["correctness"].append(check_case(*c, seed=i))
        if path is not None:
            path.write_text(json.dumps(out["correctness"], indent=1))
    return all(r["ok"] for r in out["correctness"])


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


# candidates chosen from ptxas's resource report (compiled here ahead of time: registers, spills, shared memory)
FWD_TILES = [Tiles(128, 64, 8, 3), Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 3)]
DQ_TILES = [Tiles(64, 32, 4, 3), Tiles(64, 64, 4, 2), Tiles(128, 64, 8, 2)]
DKDV_TILES = [Tiles(32, 32, 8, 2), Tiles(64, 64, 4, 2), Tiles(64, 64, 8, 2), Tiles(32, 64, 4, 3), Tiles(32, 64, 8, 2),
              Tiles(64, 128, 8, 2)]


def try_config(launch, flops):
    """Compile and time one launch; returns (ms, info with registers / spills / shared memory of its kernels)."""
    try:
        kernels = launch()[-1]
        kernels = kernels if isinstance(kernels, tuple) else (kernels,)
        ms = bench_ms(launch)
        info = dict(regs=[k.n_regs for k in kernels], spills=[k.n_spills for k in kernels],
                    shared=[k.metadata.shared for k in kernels], tflops=flops / ms / 1e9)
    except Exception as e:  # a config can exceed shared memory or registers
        ms, info = float("inf"), dict(error=repr(e)[:200])
    return ms, info


def sweep_shape(name, dqk, dv, quick, log_rows):
    """Time a few tile configs per kernel at S=4096 for one head shape; return the fastest FlashConfig."""
    fwd_c, dq_c, kv_c = (FWD_TILES[:2], DQ_TILES[:2], DKDV_TILES[:2]) if quick else (FWD_TILES, DQ_TILES, DKDV_TILES)
    s = 4096
    b = TOKENS // s
    q, k, v, do = make_inputs(b, s, dqk, dv)
    scale = dqk**-0.5
    base = default_config(dqk, dv, q.device)
    f = flops_fwd(b, HEADS, s, dqk, dv)
    res = {}
    for t in fwd_c:
        cfg = FlashConfig(t, base.bwd_dq, base.bwd_dkdv)
        res[t], info = try_config(partial(triton_flash_forward, q, k, v, True, scale, cfg), f)
        log_rows.append(dict(shape=name, kernel="fwd", tiles=t.__dict__, ms=res[t], **info))
        log(name, "fwd", t, f"{res[t]:.3f} ms", info)
    best_f = min(fwd_c, key=res.get)
    o, lse, _ = triton_flash_forward(q, k, v, True, scale, FlashConfig(best_f, base.bwd_dq, base.bwd_dkdv))

    def bwd(tq, tk):  # the two backward kernels are independent: tune dQ first, then dK/dV
        cfg = FlashConfig(best_f, tq, tk)
        ms, info = try_config(partial(triton_flash_backward, do, q, k, v, o, lse, True, scale, cfg), 2.5 * f)
        log_rows.append(dict(shape=name, kernel="bwd", tiles_dq=tq.__dict__, tiles_dkdv=tk.__dict__, ms=ms, **info))
        log(name, "bwd", tq, tk, f"{ms:.3f} ms", info)
        return ms

    best_q = min(dq_c, key=lambda tq: bwd(tq, base.bwd_dkdv))
    best_k = min(kv_c, key=lambda tk: bwd(best_q, tk))
    return FlashConfig(best_f, best_q, best_k)


def sweep_configs(out, quick):
    """A tiny, explicit autotune: the fastest tiles per kernel and head shape."""
    out["sweep"] = []
    best = {name: sweep_shape(name, dqk, dv, quick, out["sweep"]) for name, (dqk, dv) in SHAPES.items()}
    for name, c in best.items():
        log(name, "best", c)
    out["best_configs"] = {n: {k_: t.__dict__ for k_, t in c.__dict__.items()} for n, c in best.items()}
    return best


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
    return dict(ms_fwd=ms_f, ms_fwdbwd=ms_fb, tflops_fwd=flops / ms_f / 1e9, tflops_fwdbwd=3.5 * flops / ms_fb / 1e9)


def bench_point(name, dqk, dv, s, cfg, budget_s):
    """Every method at one (head shape, seq): same inputs, outputs checked against ours."""
    b = TOKENS // s
    q, k, v, do = make_inputs(b, s, dqk, dv, seed=s)
    f = flops_fwd(b, HEADS, s, dqk, dv)
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


def run_bench(out, best, seqs, budget_s):
    """Forward and forward+backward TFLOP/s of every method at every (shape, seq)."""
    out["bench"] = [r for name, (dqk, dv) in SHAPES.items() for s in seqs
                    for r in bench_point(name, dqk, dv, s, best.get(name), budget_s)]


def plot(out, path):
    """Two rows (head shapes) x two columns (forward, forward+backward) of TFLOP/s against sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for r, name in enumerate(SHAPES):
        for c, key in enumerate(("tflops_fwd", "tflops_fwdbwd")):
            ax = axes[r, c]
            rows = [x for x in out["bench"] if x["shape"] == name and key in x]
            for m in dict.fromkeys(x["method"] for x in rows):
                pts = sorted((x["seq"], x[key]) for x in rows if x["method"] == m)
                ax.plot(*zip(*pts), marker="o", lw=2.5 if m.startswith("ours") else 1.2, label=m)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name}: {'forward' if c == 0 else 'forward + backward'}, causal, bf16")
            ax.set_xlabel("sequence length (batch x seq = 16K tokens, 16 heads)")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(out["env"]["gpu"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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


def package_check(b, h, sq, sk, dqk, dv, causal, seed):
    """The flash_attn package through `flash_attn_package` vs fp32 eager attention: output and the three gradients."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(b, h, n, dqk, device="cuda", generator=g).bfloat16().requires_grad_() for n in (sq, sk))
    v = torch.randn(b, h, sk, dv, device="cuda", generator=g).bfloat16().requires_grad_()
    do = torch.randn(b, h, sq, dv, device="cuda", generator=g).bfloat16()
    ref = attend(q.float(), k.float(), v.float(), causal)
    ref_g = torch.autograd.grad(ref, (q, k, v), do.float())
    o = flash_attn_package(q, k, v, causal)
    errs = [rel_err(o, ref)] + [rel_err(x, r) for x, r in zip(torch.autograd.grad(o, (q, k, v), do), ref_g)]
    row = dict(b=b, h=h, sq=sq, sk=sk, dqk=dqk, dv=dv, causal=causal, err_o=errs[0], err_dq=errs[1], err_dk=errs[2],
               err_dv=errs[3], tol=1e-2, ok=max(errs) <= 1e-2)
    log("package check", row)
    return row


def decode_point(b, h, t, dqk, dv):
    """One decode step's attention (1 query row against t cached keys, bf16): the package, SDPA and eager, in us."""
    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(b, h, 1, dqk, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(b, h, t, dqk, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(b, h, t, dv, device="cuda", generator=g, dtype=torch.bfloat16)
    row = dict(batch=b, heads=h, cached=t, dqk=dqk, dv=dv, bytes_read=2 * b * h * t * (dqk + dv))
    ref = attend(q.float(), k.float(), v.float(), False)  # one query row sees every cached key: no mask needed
    for backend in ("flash_attn", "sdpa", "eager"):
        fn = partial(attend, q, k, v, False, backend=backend)
        row[f"err_{backend}"] = rel_err(fn().float(), ref)
        row[f"us_{backend}"] = 1e3 * bench_ms(fn)
        row[f"tb_s_{backend}"] = row["bytes_read"] / row[f"us_{backend}"] / 1e6
    log("decode", row)
    return row


def package_main(a):
    """--package: is the flash_attn package installed and right, and how fast, for training and decode shapes."""
    out = dict(env=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    save = lambda: (Path(a.out) / "attention_flash_attn.json").write_text(json.dumps(out, indent=1, default=str))  # noqa: E731
    try:
        out["package"] = flash_attn_func()[0]
        import importlib.metadata as md

        out["versions"] = {n: md.version(n) for n in ("flash-attn-4", "flash-attn", "nvidia-cutlass-dsl-libs-core")
                           if n in {d.metadata["Name"] for d in md.distributions()}}
    except ImportError as e:
        out["error"] = str(e)
    if "package" in out:
        out["correctness"] = []
        for i, (b, h, sq, sk, dqk, dv, causal) in enumerate([
                (2, 4, 1000, 1000, 192, 128, True), (2, 4, 1000, 1000, 192, 128, False), (1, 8, 17, 17, 192, 128, True),
                (1, 4, 2048, 2048, 128, 128, True), (2, 16, 1, 384, 96, 64, True), (2, 16, 7, 384, 96, 64, True)]):
            try:
                out["correctness"].append(package_check(b, h, sq, sk, dqk, dv, causal, i))
            except Exception as e:  # a shape the package refuses
                out["correctness"].append(dict(b=b, h=h, sq=sq, sk=sk, dqk=dqk, dv=dv, causal=causal, error=repr(e)[:300]))
                log("package check failed", out["correctness"][-1])
        save()  # after each section: a timeout keeps what was measured
        out["bench"] = [r for name, (dqk, dv) in SHAPES.items() for s in (1024, 4096, 16384)
                        for r in bench_point(name, dqk, dv, s, None, a.budget)]
        save()
        out["decode"] = []
        for b, t in ((1, 384), (32, 384), (1, 4096), (32, 4096)):  # gpu-small's naive MLA decode: 16 heads, 96/64
            try:
                out["decode"].append(decode_point(b, 16, t, 96, 64))
            except Exception as e:
                out["decode"].append(dict(batch=b, cached=t, error=repr(e)[:300]))
            save()
    save()
    if out.get("bench"):
        print(table(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and configs")
    ap.add_argument("--out", default=os.environ.get("OUT", "results"), help="directory for the JSON and PNG (default: $OUT, else results/)")
    ap.add_argument("--budget", type=float, default=420, help="seconds after which remaining timings are skipped")
    ap.add_argument("--no-sweep", action="store_true", help="use default_config instead of sweeping tiles")
    ap.add_argument("--check-only", action="store_true", help="only the correctness checks (run as a subprocess)")
    ap.add_argument("--sanitize", action="store_true", help="a few small-head-dim cases, for compute-sanitizer")
    ap.add_argument("--ncu", action="store_true", help="only run our forward+backward once at the MLA shape (for ncu)")
    ap.add_argument("--package", action="store_true", help="only the flash_attn package: checks, training and decode "
                    "timings (writes attention_flash_attn.json)")
    a = ap.parse_args()
    import triton

    if a.package:
        return package_main(a)

    if a.ncu:
        q, k, v, do = make_inputs(4, 4096, *SHAPES["mla_192_128"])
        flash_attention(q, k, v, True).backward(do)
        torch.cuda.synchronize()
        return

    out = dict(env=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                        python=platform.python_version(), cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
               flop_formula="forward = B*H*S^2*(dqk+dv) (causal); fwd+bwd = 3.5 x forward", tokens=TOKENS, heads=HEADS)
    log(out["env"])
    if a.check_only:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        check_correctness(out, a.quick, Path(a.out) / "attention_check.json")
        return
    if a.sanitize:  # small head dims with sq < sk, bisected: run under compute-sanitizer
        for c in [(2, 6, 3, 100, 233, 32, 32), (2, 6, 3, 233, 233, 24, 12), (1, 1, 1, 100, 233, 24, 12),
                  (2, 6, 3, 100, 233, 24, 12)]:
            check_case(*c, True, torch.bfloat16, 0)
            torch.cuda.synchronize()
        return
    # the checks run in their own process: a kernel fault poisons the CUDA context, the timings must survive it
    r = subprocess.run([sys.executable, __file__, "--check-only", "--out", a.out] + ["--quick"] * a.quick)
    check_file = Path(a.out) / "attention_check.json"
    out["correctness"] = json.loads(check_file.read_text()) if check_file.exists() else []
    out["correctness_rc"] = r.returncode
    log("correctness", r.returncode, all(x["ok"] for x in out["correctness"]))
    best = {} if a.no_sweep else sweep_configs(out, a.quick)
    for name, cfg in best.items():  # the swept tiles must be right too
        dqk, dv = SHAPES[name]
        for causal in (True, False):
            out["correctness"].append(check_case(2, 4, 2, 777, 777, dqk, dv, causal, torch.bfloat16, 99, cfg))
    ok = out["correctness_rc"] == 0 and all(r["ok"] for r in out["correctness"])
    seqs = [1024, 4096] if a.quick else [1024, 2048, 4096, 8192, 16384]
    run_bench(out, best, seqs, a.budget)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "attention_bench.json").write_text(json.dumps(out, indent=1, default=str))
    plot(out, Path(a.out) / "attention_bench.png")
    print(json.dumps(out.get("best_configs", {})))
    print("correctness:", "PASS" if ok else "FAIL", "max errors:",
          {k_: f"{max(r[k_] for r in out['correctness']):.1e}" for k_ in ("err_o", "err_dq", "err_dk", "err_dv")}
          if out["correctness"] else "none")
    print(table(out))


if __name__ == "__main__":
    main()
