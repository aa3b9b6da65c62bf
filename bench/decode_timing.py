"""How bench/decode.py and bench/decode_mtp.py time a generate call: wall time with the device synchronized, tok/s,
time to first token, peak memory, and the device's copy bandwidth."""
from __future__ import annotations

import gc
import time

import torch

from dsv3_min.infer import free_decoders


def timed(fn) -> float:
    "Wall seconds of `fn()` with the device synchronized around it."
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def copy_bandwidth(device, gib: float = 2.0) -> float:
    "Measured copy bandwidth of `device`, bytes/s: 2 x bytes (read + write) of a `gib` GiB copy / its time, best of 10."
    x = torch.ones(int(gib * 2**30), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * x.numel() / min(timed(lambda: y.copy_(x)) for _ in range(10))


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def measure(run, batch: int, new: int, reps: int) -> dict:
    "tok/s (best of `reps` after one warm-up), ttft and peak memory of `run(max_new_tokens)`."
    run(new)  # warm-up: CUDA graphs captured, kernels compiled
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wall = min(timed(lambda: run(new)) for _ in range(reps))
    peak = peak_gib()
    # ttft last: a 1-token call builds a second engine (another cache length), and a second compiled engine of the
    # same step makes dynamo check two guard sets per call, which slowed the timed engine on the CPU
    ttft = min(timed(lambda: run(1)) for _ in range(2))
    return dict(tok_s=batch * new / wall, decode_tok_s=batch * (new - 1) / max(wall - ttft, 1e-9), wall_s=wall,
                ttft_s=ttft, peak_mem_gib=peak)


def measure_ours(run, batch: int, new: int, reps: int) -> dict:
    "tok/s of our `run(max_new_tokens, stats)` (best of `reps` after one warm-up that builds, compiles and captures its"
    " engine), ttft from its stats (same engine), the engine's first-step seconds `compile_s`, and peak memory."
    first = {}
    run(new, first)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    calls = []
    for _ in range(reps):
        st = {}
        calls.append((timed(lambda st=st: run(new, st)), st["ttft_s"]))
    wall, ttft = min(calls)
    return dict(tok_s=batch * new / wall, decode_tok_s=batch * (new - 1) / max(wall - ttft, 1e-9), wall_s=wall,
                ttft_s=ttft, peak_mem_gib=peak_gib(), compile_s=first["compile_s"], compiled=first["compiled"],
                cuda_graph=first["cuda_graph"])


def free(model=None):
    "Drop cached decoders (and their graphs) and dynamo's compiled steps (its recompile limit counts per function, so"
    " a dozen engines would fall back to eager), and collect: the next engine and peak-memory reading start clean."
    if model is not None:
        free_decoders(model)
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def record(out: dict, name: str, b: int, r: dict) -> None:
    out.setdefault(name, {})[str(b)] = r
    print(name, b, r, flush=True)
