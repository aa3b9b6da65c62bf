"""Where a decode step's time goes: the host-launch gap before and after CUDA graphs (gpu-small, bf16, batch 1).

    python bench/decode_profile.py [--out DIR] [--steps 10]

Random-weight gpu-small in bf16, a 128-token prompt, then greedy decode steps through `dsv3_min.infer.Decoder`
in three variants: eager (every kernel launched from Python), CUDA graph (one replay per step), and CUDA graph of
the `torch.compile`d step (fewer, fused kernels); then the absorbed MLA compiled in a graph with its one-kernel Triton
decode attention (notebook 14) and without it (attn_backend='eager': the same weights, PyTorch attention). For each, `torch.profiler` records `--steps` steps; from its trace
we count the kernels per step, their summed GPU time ("busy") and the wall time per step, so
    idle fraction = 1 - busy / wall      (the GPU waiting for the host)
Each profiled step ends with a synchronize, so every kernel falls inside its own step's marker (the committed
results/decode_profile.json predates this: its graph rows count part of the dropped first step, see notebook 28;
results/decode_profile_synced.json is the re-run with it).
Writes DIR/decode_profile.json (per variant: wall, busy, kernels per step, the top kernels, and the kernel
timeline of two steps for the notebook's plot) and DIR/decode_profile.png.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from dsv3_min.config import get_preset
from dsv3_min.infer import Decoder
from dsv3_min.model import DeepSeekV3

VARIANTS = {"eager": dict(cuda_graph=False, compile=False), "cuda_graph": dict(cuda_graph=True, compile=False),
            "cuda_graph+compile": dict(cuda_graph=True, compile=True),  # the three above: MLA 'naive' (the preset's)
            "absorb+compile": dict(cuda_graph=True, compile=True, mla_impl="absorb"),  # the Triton decode kernel
            "absorb+compile, eager attention": dict(cuda_graph=True, compile=True, mla_impl="absorb",
                                                    attn_backend="eager")}  # the same without it (notebook 14)


def wall_us(dec: Decoder, tok: torch.Tensor, n: int) -> float:
    "Mean wall microseconds of one decode step over `n` steps (synchronized at both ends)."
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        dec.step(tok)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def profile_steps(dec: Decoder, tok: torch.Tensor, steps: int) -> list[dict]:
    "The kernels of `steps` profiled decode steps: one list of {name, ts, dur} (us) per step, from the trace."
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            with record_function(f"decode_step_{i}"):
                dec.step(tok)
                torch.cuda.synchronize()  # a replayed graph runs behind the host: keep each step's kernels in its window
    path = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    ev = json.loads(path.read_text())["traceEvents"]
    kernels = sorted((e for e in ev if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    marks = sorted((e for e in ev if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("decode_step_")),
                   key=lambda e: e["ts"])
    bounds = [m["ts"] for m in marks[1:]] + [float("inf")]
    per = [[] for _ in marks]
    for k in kernels:  # a kernel belongs to the step whose launch window precedes it
        i = next(j for j, b in enumerate(bounds) if k["ts"] < b)
        per[i].append(dict(name=k["name"], ts=k["ts"], dur=k["dur"]))
    return per


def summarize(per: list[list[dict]], wall: float) -> dict:
    "Kernels, busy time and idle fraction per step; top kernels by time; a two-step timeline relative to its start."
    steady = per[1:] if len(per) > 2 else per
    busy = sum(k["dur"] for s in steady for k in s) / len(steady)
    n = sum(len(s) for s in steady) / len(steady)
    tot = defaultdict(lambda: [0.0, 0])
    for s in steady:
        for k in s:
            tot[k["name"][:80]][0] += k["dur"] / len(steady)
            tot[k["name"][:80]][1] += 1
    top = sorted(tot.items(), key=lambda x: -x[1][0])[:12]
    two = [k for s in steady[:2] for k in s]
    t0 = two[0]["ts"] if two else 0
    return dict(wall_us_per_step=wall, busy_us_per_step=busy, kernels_per_step=n, idle_frac=max(0.0, 1 - busy / wall),
                tok_s_b1=1e6 / wall,
                top_kernels=[dict(name=k, us_per_step=v[0], launches=v[1] // len(steady)) for k, v in top],
                timeline=[[round(k["ts"] - t0, 2), round(k["dur"], 2), k["name"][:40]] for k in two])


def plot(out: dict, path: Path) -> None:
    "One row per variant: the kernels of two steps on a time axis (gaps = the GPU idle, waiting for the host)."
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(v, r) for v, r in out["variants"].items() if "timeline" in r]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.6 * len(rows) + 0.6), squeeze=False)
    for ax, (v, r) in zip(axes[:, 0], rows):
        ax.broken_barh([(t, max(d, 0.3)) for t, d, _ in r["timeline"]], (0, 1), color="tab:blue")
        ax.set_yticks([])
        ax.set_title(f"{v}: {r['kernels_per_step']:.0f} kernels/step, busy {r['busy_us_per_step']:.0f} us of "
                     f"{r['wall_us_per_step']:.0f} us ({100 * r['idle_frac']:.0f}% idle)", fontsize=9)
        ax.set_xlabel("microseconds (two decode steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--preset", default="gpu-small")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = get_preset(a.preset)
    model = DeepSeekV3(cfg).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 128), device="cuda")
    out = dict(preset=a.preset, dtype="bfloat16", batch=1, prompt=128, device=torch.cuda.get_device_name(),
               torch=torch.__version__, steps=a.steps, variants={})
    twin = DeepSeekV3(get_preset(a.preset, attn_backend="eager")).to("cuda", torch.bfloat16).eval()
    twin.load_state_dict(model.state_dict())  # same weights; its absorbed attention stays in PyTorch
    for name, kw in VARIANTS.items():
        kw = dict(kw)
        m = twin if kw.pop("attn_backend", None) == "eager" else model
        torch._dynamo.reset()  # each variant compiles afresh (dynamo's recompile limit counts per function)
        try:
            with torch.inference_mode():
                dec = Decoder(m, 1, 512, **kw)
                dec.prefill(prompt, torch.zeros(1, dtype=torch.long, device="cuda"))
                tok = prompt[:, -1]
                for _ in range(8):  # warm-up: capture, compile
                    dec.step(tok)
                dec.pos.fill_(128)
                wall = wall_us(dec, tok, 100)
                dec.pos.fill_(128)
                per = profile_steps(dec, tok, a.steps)
            out["variants"][name] = summarize(per, wall)
            r = out["variants"][name]
            print(f"{name}: {r['wall_us_per_step']:.0f} us/step wall, {r['busy_us_per_step']:.0f} us busy, "
                  f"{r['kernels_per_step']:.0f} kernels, {100 * r['idle_frac']:.0f}% idle", flush=True)
        except Exception as e:  # compile failures etc. are recorded, the other variants still run
            out["variants"][name] = dict(error=repr(e)[:400])
            print(name, "failed:", repr(e)[:400], flush=True)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "decode_profile.json").write_text(json.dumps(out, indent=1))
    plot(out, Path(a.out) / "decode_profile.png")


if __name__ == "__main__":
    main()
