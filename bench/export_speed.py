"""Deployment export on CPU: train cpu-tiny briefly with the package's own loop (`python -m dsv3_min train`), export it
with `dsv3_min.export`, then measure in one process on this machine
  * decode tok/s (batch 1, greedy, 2 threads): llama.cpp q8_0 and f32 (llama-cpp-python), onnxruntime through the
    exported decode step, and our torch eager `generate` (grouped experts; and the dense export copy);
  * size and quality: file size per GGUF dtype and bits/byte on Shakespeare's validation split through llama.cpp's
    logits (bits/byte = sum of -log2 p(token) / UTF-8 bytes of the scored tokens), next to ours in torch.
Writes results/export_speed.json and results/export_quality.json (or --out DIR). The load average is recorded: the
machine is shared, so compare the numbers of one run with each other, not across runs.
  python bench/export_speed.py --train-seconds 240"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dsv3_min.__main__ import main as dsv3
from dsv3_min.checkpoint import load_trained
from dsv3_min.data import load_corpus
from dsv3_min.export import export_copy, export_onnx, load_llama, onnx_generate, write_gguf
from dsv3_min.files import read_jsonl, write_json
from dsv3_min.infer import generate


def llama(path: Path, n_ctx: int, logits_all: bool = False):
    return load_llama(path, n_ctx, logits_all)  # f32 cache, no weight repacking (crashes on tiny q8_0 here)


def tok_s(fn, new: int, reps: int = 3) -> float:
    "Decode tokens per second of `fn()` generating `new` tokens: best of `reps` after a warm-up."
    fn()
    best = min(_wall(fn) for _ in range(reps))
    return new / best


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def llama_greedy(llm, prompt: list[int], new: int) -> list[int]:
    "`new` greedy tokens from llama.cpp (top-k 1)."
    out = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        out.append(t)
        if len(out) == new:
            return out
    return out


def bits_per_byte_llama(llm, windows: list[list[int]]) -> float:
    "Bits per UTF-8 byte of the tokens llama.cpp predicts in `windows` (each evaluated from an empty context)."
    nats = 0.0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.array(llm.scores[: len(w) - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nats -= logp[np.arange(len(w) - 1), w[1:]].sum()
    return nats / math.log(2)


@torch.no_grad()
def bits_per_byte_ours(model, windows: list[list[int]]) -> float:
    nats = 0.0
    for w in windows:
        logp = model(torch.tensor([w]))[0, :-1].double().log_softmax(-1)
        nats -= logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
    return nats / math.log(2)


def val_windows(tok, n_windows: int, width: int) -> tuple[list[list[int]], int]:
    "Non-overlapping token windows of the validation split, and the UTF-8 bytes of the tokens they predict."
    text = "\n".join(t for _, t in load_corpus("shakespeare").docs("val"))
    ids = tok.encode(text[: n_windows * width * 8])
    windows = [ids[i * width:(i + 1) * width] for i in range(n_windows)]
    scored = sum(len(tok.decode(w[1:]).encode()) for w in windows)
    return windows, scored


def run(a) -> None:
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="export_bench_"))
    load = [os.getloadavg()[0]]
    t0 = time.time()
    run_dir = a.run or work / "run"  # --run: a cpu-tiny run trained earlier by this script
    if not a.run:
        assert dsv3(["train", "--preset", "cpu-tiny", "--out", str(run_dir), "--time-budget", str(a.train_seconds),
                     "--no-progress"]) == 0
    model, tok = load_trained(run_dir)
    steps = read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]
    model.eval()
    files = {d: write_gguf(model, tok, work / f"m-{d}.gguf", d) for d in ("f32", "f16", "q8_0")}
    t_onnx = time.time()
    pre, step = export_onnx(model, work / "m.onnx")
    t_onnx = time.time() - t_onnx
    prompt = tok.encode("KING HENRY:\nNow, lords, ")
    n = a.new_tokens
    ids = torch.tensor([prompt])
    dense = export_copy(model)
    q8, f32 = llama(files["q8_0"], 512), llama(files["f32"], 512)
    speeds = {
        "llama_cpp_q8_0": tok_s(lambda: llama_greedy(q8, prompt, n), n),
        "llama_cpp_f32": tok_s(lambda: llama_greedy(f32, prompt, n), n),
        "onnxruntime_decode_step": tok_s(lambda: onnx_generate(step, ids.numpy(), n), n),
        "torch_eager_generate": tok_s(lambda: generate(model, ids, n, temperature=0), n),
        "torch_eager_generate_dense_experts": tok_s(lambda: generate(dense, ids, n, temperature=0), n)}
    load.append(os.getloadavg()[0])
    windows, scored_bytes = val_windows(tok, a.windows, a.width)
    quality = {"ours_torch_f32": {"bits_per_byte": bits_per_byte_ours(model, windows) / scored_bytes}}
    for d, f in files.items():
        bpb = bits_per_byte_llama(llama(f, a.width, logits_all=True), windows) / scored_bytes
        quality[f"llama_cpp_{d}"] = {"bits_per_byte": bpb, "file_mib": f.stat().st_size / 2**20}
    onnx_mib = (pre.stat().st_size + step.stat().st_size) / 2**20
    load.append(os.getloadavg()[0])
    common = {"model": "cpu-tiny", "train_seconds": a.train_seconds, "train_steps": steps, "threads": 2, "batch": 1,
              "load_average_1min": load, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    base = speeds["torch_eager_generate"]
    write_json(a.out / "export_speed.json", {
        **common, "new_tokens": n, "prompt_tokens": len(prompt), "tok_s": speeds, "onnx_export_seconds": t_onnx,
        "onnx_mib": onnx_mib, "ratio_to_torch_eager": {k: v / base for k, v in speeds.items()},
        "wall_seconds": time.time() - t0})
    write_json(a.out / "export_quality.json", {**common, "split": "shakespeare validation", "windows": a.windows,
                                              "window_tokens": a.width, "scored_bytes": scored_bytes,
                                              "formula": "sum over scored tokens of -log2 p(token) / UTF-8 bytes",
                                              "results": quality})
    print(speeds, quality)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-seconds", type=float, default=240)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--run", type=Path, help="reuse this cpu-tiny run folder instead of training one")
    run(p.parse_args())
