"""The measurements, statistics and plot of `bench/distill_gpu.py` (imported by it; not a script)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from dsv3_min.infer import generate
from dsv3_min.train import read_metrics


def curve_summary(r) -> dict:
    "A run's final val bits/byte, steps, seconds, why it stopped and its curve [step, elapsed_s, val bpb]."
    curve = [[m["step"], round(m["elapsed_s"], 2), m["val_bits_per_byte"]] for m in read_metrics(r.run_dir)
             if "val_bits_per_byte" in m]
    return dict(val_bpb=r.val_bpb, val_loss=r.val_loss, steps=r.step, seconds=round(r.seconds, 2),
                stopped=r.stopped, curve=curve)


def noise(bpb: dict) -> dict:
    "Seed noise of scratch: the sample standard deviation (n - 1) of the seeds' final bits/byte, and their mean."
    v = [bpb[k] for k in ("scratch_s0", "scratch_s1", "scratch_s2") if bpb.get(k) is not None]
    if len(v) < 2:
        return dict(seed_noise_bpb=None, scratch_mean_bpb=None, scratch_seeds=len(v))
    return dict(seed_noise_bpb=statistics.stdev(v), scratch_mean_bpb=statistics.fmean(v), scratch_seeds=len(v),
                seed_noise_statistic="sample std (n-1) of the final val bits/byte over scratch seeds 0, 1, 2")


def targets(res: dict) -> dict:
    "Issue 33's targets: > 5x seed noise better than scratch at equal steps; no worse at equal total wall clock."
    s, d, n, e = (res.get(k) for k in ("scratch_bpb", "distilled_bpb", "seed_noise_bpb", "equal_time_scratch_bpb"))
    return dict(
        beats_scratch_by_5x_noise=(s - d > 5 * n) if None not in (s, d, n) else None,
        gain_over_noise=((s - d) / n) if None not in (s, d, n) and n > 0 else None,
        no_worse_at_equal_time=(d <= e) if None not in (d, e) else None,
        decode_2x=res["decode_speedup_b1"] >= 2 if "decode_speedup_b1" in res else None,
        quarter_params=res["student_params"] <= res["teacher_params"] / 4)


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new: int) -> dict:
    "Greedy tokens/s at batch 1 (a warm-up call first) and peak memory, weights included."
    gen, engine = (lambda m, x, n: generate(m, x, n, temperature=0.0)), "dsv3_min.infer.generate"
    cuda = prompt.device.type == "cuda"
    if cuda:  # memory of this model's decoding: what the calls allocate beyond what is already resident
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    gen(model, prompt, new)  # warm-up with the same shapes: builds the engine's caches and captures its graph
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = gen(model, prompt, new)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n = out.shape[-1] - prompt.shape[-1]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return dict(engine=engine, new_tokens=n, seconds=round(dt, 4), tok_s=round(n / dt, 1),
                weights_gib=round(weights / 2**30, 4), decode_extra_gib=round(extra, 4) if cuda else None,
                mem_gib=round(weights / 2**30 + extra, 4) if cuda else None)


def plot(res: dict, path: Path) -> None:
    "Validation curves of the students and the gap-closed bars (skipped without matplotlib)."
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in res["students"].items():
        if r.get("curve"):
            c = list(zip(*r["curve"]))
            a.plot(c[0], c[2], label=name)
    if res.get("teacher_bpb"):
        a.axhline(res["teacher_bpb"], color="k", ls="--", label="teacher")
    a.set(xlabel="step", ylabel="val bits/byte", title="students")
    a.legend(fontsize=7)
    for name, r in res.get("sweep", {}).items():
        if r.get("val_bpb") is not None:
            a.scatter([r["steps"]], [r["val_bpb"]], marker="x", label=f"sweep {name} (select half)")
    gaps = {k: v for k, v in res.get("gap_closed", {}).items() if v is not None}
    b.bar(list(gaps), list(gaps.values()))
    b.set(ylabel="% of the teacher-student gap closed", title="gap closed vs scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
