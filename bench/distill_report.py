"""The decode-speed measurement and the plot of `bench/distill_gpu.py` (imported by it; not a script)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from dsv3_min.infer import generate


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
    a.legend()
    gaps = {k: v for k, v in res.get("gap_closed", {}).items() if v is not None}
    b.bar(list(gaps), list(gaps.values()))
    b.set(ylabel="% of the teacher-student gap closed", title="gap closed vs scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
