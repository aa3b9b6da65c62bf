"""Attention kernels on one GPU: correctness of our Triton FlashAttention-2, then forward and forward+backward
TFLOP/s against PyTorch's SDPA backends, flex_attention and the naive path, at two head shapes.

    python bench/attention.py [--quick] [--out DIR]
    python bench/attention.py --package [--out DIR]   # the flash_attn package (FlashAttention-4 or 2) only


Writes DIR/attention_bench.json and DIR/attention_bench.png (DIR defaults to $OUT, else results/) and prints a
short table last. Needs a CUDA GPU and triton.

FLOP count: `dsv3_min.flash.attention_flops` (notebook 12, the convention recorded in docs/reference.md): a causal
forward is B·H·S²·(dqk + dv), forward + backward 3.5 forwards (`FWD_BWD_FLOPS`). Every method is timed on the same
inputs with the same formula, so the ratios are exact whatever the convention. The inputs, the methods, the timing
and the table are in bench/attention_common.py; `--package` runs bench/attention_package.py.
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
from attention_common import (
    HEADS,
    SHAPES,
    TOKENS,
    bench_ms,
    bench_point,
    case_inputs,
    errors_vs_eager,
    log,
    make_inputs,
    table,
)

from dsv3_min.flash import FWD_BWD_FLOPS, FlashConfig, Tiles, attention_flops, default_config
from dsv3_min.flash_backend import flash_attention
from dsv3_min.flash_triton import TritonFlashAttention, triton_flash_backward, triton_flash_forward


def poison():
    """Fill freed allocator memory with NaN, so an output element the kernel forgets to write shows up as NaN."""
    free = torch.cuda.mem_get_info()[0]
    t = torch.full((min(free // 4, 2 << 30) // 4,), float("nan"), device="cuda")
    del t


def check_case(b, hq, hkv, sq, sk, dqk, dv, causal, dt, seed, cfg=None):
    """One case: our kernel (default tiles, or `cfg`) vs fp32 eager attention on fresh random inputs."""
    q, k, v, do = case_inputs(b, hq, hkv, sq, sk, dqk, dv, dt, seed)
    kernel = (lambda q, k, v: flash_attention(q, k, v, causal)) if cfg is None else (
        lambda q, k, v: TritonFlashAttention.apply(q, k, v, causal, dqk**-0.5, cfg))
    errs = errors_vs_eager(kernel, q, k, v, do, causal, before=poison)
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
    f = attention_flops(b, HEADS, s, dqk, dv)
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
        ms, info = try_config(partial(triton_flash_backward, do, q, k, v, o, lse, True, scale, cfg), (FWD_BWD_FLOPS - 1) * f)
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
        from attention_package import package_main
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
