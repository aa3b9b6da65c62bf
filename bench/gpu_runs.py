"""The GPU training run and its ablations (issue 8), in three steps: `prepare` (CPU), `run` (GPU), `report` (CPU).

    python bench/gpu_runs.py prepare --deb /tmp/dict-gcide_*.deb   # here: corpus mix -> tokenizer -> packed tokens
    python bench/gpu_runs.py run --out $OUT/gpu_train               # on the GPU: smoke, main run, ablations, bench
    python bench/gpu_runs.py report --tar gpu_train.tar.gz          # here: unpack into results/gpu_train/, plot

Data. The corpus is the mix `shakespeare+python-stdlib+<gcide>` (notebook 01's `load_corpus("a+b+c")`): the plays,
the Python standard library, and the Collaborative International Dictionary of English (GCIDE, Webster 1913 +
WordNet; Debian's `dict-gcide`, GPL-2+, so neither its text nor its tokens are committed). `prepare` trains a
16,384-id tokenizer on it and packs both splits (notebook 01's `pack`) into `.device_carry/a2/` (git-ignored), which
travels to the GPU machine. There the runs read those packed tokens: the GPU machine has a different Python (so a
different stdlib) and sentencepiece, and re-tokenizing there would spend GPU time on CPU work. So `run` calls the
same `dsv3_min.train.train` that `python -m dsv3_min train` calls, with the same presets and `--set` overrides
(`_configs` below mirrors the CLI's), and hands it the packed data.

Runs (all on one H200, bf16 autocast, batch 16 x 1024 tokens, the gpu-small model with a 16,384-id vocabulary):
  main        gpu-small, torch.compile, `MAIN_BUDGET` s (compilation, ~50 s on an H200, counted in); the cosine decay
              is laid out over the time budget. Then samples from its final weights.
  ablations   eager (no compile: compile time would eat a short budget unequally), `ABL_BUDGET` s each, same seed so
              the same batches in the same order:
                base      the V3 recipe: MoE + MLA, aux-loss-free balancing (gamma 1e-3) + tiny seq. aux loss, MTP
                dense     GQA + SwiGLU in every layer, intermediate_size 2688: active parameters within 0.4% of base
                aux       plain auxiliary loss: bias_update_speed=0, aux_loss_alpha=0.01
                nobal     no balancing at all: bias_update_speed=0, aux_loss_alpha=0
                nomtp     num_nextn_predict_layers=0

`run` never starts work that could not end by `--deadline` (seconds after its start): the ablations share what is
left after the main run, and the throughput bench runs last, only if ~95 s remain. SIGTERM (e.g. from `timeout`)
ends the current run after its step (its last periodic evaluation stands) and starts nothing new. As one device
call (570 s):

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; mkdir -p $OUT/g
    timeout -k 10 545 python3 bench/gpu_runs.py run --out $OUT/g/gpu_train --deadline 525 2>&1 | tee $OUT/g/log.txt
    tar czf $OUT/gpu_train.tar.gz -C $OUT/g --exclude='ckpt-*' --exclude='.tmp-*' gpu_train log.txt
    rm -rf $OUT/g/gpu_train                                   # carry: .device_carry/a2 (31 MB of packed tokens)
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".device_carry" / "a2"
VOCAB = 16384
PRESET = "gpu-small"
COMMON = {"vocab_size": VOCAB, "seed": 0, "batch_size": 16, "seq_len": 1024, "max_steps": 100_000,
          "ckpt_every": 0, "keep_last": 1}
MAIN = {**COMMON, "compile": True, "warmup": 200, "eval_every": 250, "eval_batches": 16}
ABL = {**COMMON, "compile": False, "warmup": 50, "eval_every": 50, "eval_batches": 8}
MAIN_BUDGET, ABL_BUDGET = 180.0, 35.0  # seconds of training; the main run's includes ~50 s of compile
DENSE = {"attention": "gqa", "num_key_value_heads": 4, "first_k_dense_replace": 8, "intermediate_size": 2688}
ABLATIONS = {
    "base": {},
    "dense": DENSE,
    "aux": {"bias_update_speed": 0.0, "aux_loss_alpha": 0.01},
    "nobal": {"bias_update_speed": 0.0, "aux_loss_alpha": 0.0},
    "nomtp": {"num_nextn_predict_layers": 0},
}
PROMPTS = ["ROMEO.\n", "def fibonacci(n):\n", "Love \\Love\\, n.", "The king"]


# ---------------------------------------------------------------- prepare (CPU)
_GCIDE_TAG = re.compile(r"^[ \t]*\[[^\]\n]*\][ \t]*\n", re.M)      # a line holding only a source tag: [1913 Webster]
_GCIDE_ENTRY = re.compile(r"\n\n(?=\S)")                           # entries: a blank line, then an unindented head


def gcide_docs(dict_text: str, doc_chars: int = 65536) -> list[tuple[str, str]]:
    "GCIDE's dictd text -> documents of whole entries (~`doc_chars` each), source-tag lines and preamble dropped."
    start = dict_text.index("\nA \\A\\")                              # the first entry, after the licence preamble
    text = _GCIDE_TAG.sub("", dict_text[start + 1:])
    docs, buf, size = [], [], 0
    for entry in _GCIDE_ENTRY.split(text):
        buf.append(entry)
        size += len(entry) + 2
        if size >= doc_chars:
            docs.append((f"gcide-{len(docs):04d}.txt", "\n\n".join(buf).rstrip("\n") + "\n"))
            buf, size = [], 0
    if buf:
        docs.append((f"gcide-{len(docs):04d}.txt", "\n\n".join(buf).rstrip("\n") + "\n"))
    return docs


def prepare(deb: str, max_chunks: int, rebuild: bool = False) -> None:
    "Extract GCIDE, build the mix, train the tokenizer, pack the splits into `.device_carry/a2/`."
    from dsv3_min.data import load_corpus, pack
    from dsv3_min.tokenizer import train_tokenizer
    tmp = Path("/tmp/a2_gcide")
    if not (tmp / "docs").exists() or rebuild:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["dpkg", "-x", deb, str(tmp / "deb")], check=True)
        raw = gzip.open(tmp / "deb/usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8", errors="replace").read()
        (tmp / "docs").mkdir(parents=True)
        for name, text in gcide_docs(raw):
            (tmp / "docs" / name).write_text(text)
    t0 = time.time()
    corpus = load_corpus(f"shakespeare+python-stdlib+{tmp / 'docs'}")
    print("corpus", corpus.summary(), f"{time.time() - t0:.1f}s", flush=True)
    tok = train_tokenizer(corpus, VOCAB, max_chunks=max_chunks)
    print(f"tokenizer {tok.vocab_size} ids in {time.time() - t0:.1f}s", flush=True)
    shutil.rmtree(CARRY, ignore_errors=True)
    CARRY.mkdir(parents=True)
    packed = pack(corpus, tok, cache_dir=tmp / "cache")
    for split in ("train", "val"):
        shutil.copy(packed.path / f"{split}.bin", CARRY / f"{split}.bin")
    parts = {}
    for part in ("shakespeare", "python-stdlib", "gcide"):
        docs = [t for n, t in corpus.val_docs if n.startswith(part) or (part == "gcide" and "gcide-" in n)]
        parts[part] = dict(val_docs=len(docs), val_bytes=sum(len(t.encode()) for t in docs))
    meta = {**packed.meta, "corpus": "shakespeare+python-stdlib+gcide", "summary": corpus.summary(), "val_parts": parts,
            "tokenizer_trained_on_chunks": max_chunks}
    (CARRY / "meta.json").write_text(json.dumps(meta, indent=1))
    (ROOT / "results" / "gpu_train").mkdir(parents=True, exist_ok=True)   # counts only, no text: committed
    (ROOT / "results" / "gpu_train" / "data.json").write_text(json.dumps(meta, indent=1))
    tok.save(CARRY / "tokenizer")
    print(json.dumps(meta, indent=1), f"{time.time() - t0:.1f}s", flush=True)


# ---------------------------------------------------------------- run (GPU)
def load_data(carry: Path = CARRY):
    "The packed tokens carried from `prepare`, as (`dsv3_min.train.TrainData`, the packing's meta)."
    from dsv3_min.tokenizer import Tokenizer
    from dsv3_min.train import TrainData
    meta = json.loads((carry / "meta.json").read_text())
    arr = {s: np.memmap(carry / f"{s}.bin", dtype=meta["dtype"], mode="r", shape=(meta[s]["tokens"],))
           for s in ("train", "val")}
    return TrainData(Tokenizer.load(carry / "tokenizer"), arr["train"], arr["val"],
                     meta["val"]["tokens"] / meta["val"]["bytes"]), meta


def _configs(preset: str, overrides: dict):
    "ModelConfig and TrainConfig of `preset` with `overrides`, as `python -m dsv3_min train --set` builds them."
    from dsv3_min.config import get_preset
    from dsv3_min.train import split_overrides, train_config_for
    m, t = split_overrides(overrides)
    return get_preset(preset, **m), train_config_for(preset, **t)


def train_one(name: str, overrides: dict, out: Path, data, preset: str = PRESET) -> dict:
    "One run of `dsv3_min.train.train`; returns its summary (or the error), never raises."
    import torch

    from dsv3_min.config import count_params
    from dsv3_min.train import read_metrics, train
    t0 = time.time()
    try:
        cfg, tc = _configs(preset, overrides)
        pc = count_params(cfg)
        print(f"== {name}: {pc.total / 1e6:.1f}M params ({pc.active / 1e6:.1f}M active, MTP {pc.mtp / 1e6:.1f}M), "
              f"budget {tc.time_budget:.0f}s, compile={tc.compile}", flush=True)
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        r = train(cfg, tc, out / name, data=data, progress=False)
        m = read_metrics(out / name)
        ev = [x for x in m if "val_loss" in x]
        s = dict(name=name, overrides=overrides, stopped=r.stopped, steps=r.step, train_s=round(r.seconds, 1),
                 wall_s=round(time.time() - t0, 1), tokens=r.step * tc.batch_size * tc.seq_len * tc.grad_accum,
                 final_val_loss=r.val_loss, final_val_bpb=r.val_bpb,
                 best_val_bpb=min((x["val_bits_per_byte"] for x in ev), default=None),
                 tok_s_median=float(np.median([x["tokens_per_s"] for x in m[len(m) // 5:]] or [np.nan])),
                 mfu_median=float(np.median([x.get("mfu", 0) for x in m[len(m) // 5:]] or [np.nan])),
                 peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                 params=dict(total=pc.total, active=pc.active, mtp=pc.mtp),
                 last_max_vio=next((x["max_vio"] for x in reversed(ev) if "max_vio" in x), None))
    except Exception as e:  # keep going: the other runs still count
        traceback.print_exc()
        s = dict(name=name, overrides=overrides, error=f"{type(e).__name__}: {e}", wall_s=round(time.time() - t0, 1))
    for ck in (out / name).glob("ckpt-*") if name != "main" else []:
        shutil.rmtree(ck)                                   # weights stay on the machine (and out of git)
    print(json.dumps(s), flush=True)
    return s


def samples(run_dir: Path, device: str, n_tokens: int = 160) -> list[dict]:
    "Continuations of `PROMPTS` from the run's final checkpoint (temperature 0.8, top-k 50, seed 0)."
    from dsv3_min.train import load_trained, sample_text
    model, tok = load_trained(run_dir, device)
    return [dict(prompt=p, temperature=0.8, top_k=50, seed=0,
                 text=sample_text(model, tok, p, n_tokens, 0.8, 50, None, 0)) for p in PROMPTS]


_STOP: list[str] = []  # set by SIGTERM/SIGINT: finish the current step's bookkeeping, start nothing new


def _on_signal(signum, frame) -> None:
    _STOP.append(signal.Signals(signum).name)


def run(out: Path, deadline_s: float, main_budget: float = MAIN_BUDGET, abl_budget: float = ABL_BUDGET,
        cpu_smoke: bool = False, bench: bool = True) -> None:
    "Smoke test, main run, ablations, throughput bench; stops starting work that would not end by `deadline_s`."
    import torch
    for sig in (signal.SIGTERM, signal.SIGINT):  # `train` handles them during a run; between runs they land here
        signal.signal(sig, _on_signal)
    preset, device = ("cpu-tiny", "cpu") if cpu_smoke else (PRESET, "cuda")
    tiny = {"device": "cpu", "batch_size": 2, "seq_len": 64, "threads": 1, "final_eval_batches": 2}  # CPU rehearsal
    main_cfg = {**MAIN, **tiny, "compile": False} if cpu_smoke else MAIN
    abl_cfg = {**ABL, **tiny} if cpu_smoke else ABL
    n_layers = 4 if cpu_smoke else 8
    t_start = time.time()
    left = lambda: deadline_s - (time.time() - t_start)
    out.mkdir(parents=True, exist_ok=True)
    data, meta = load_data()
    env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               python=sys.version.split()[0],
               data=dict(corpus=meta["corpus"], train_tokens=meta["train"]["tokens"], val_tokens=meta["val"]["tokens"],
                         val_bytes_per_token=meta["val"]["bytes"] / meta["val"]["tokens"], vocab=VOCAB))
    print(json.dumps(env), flush=True)
    summary = dict(env=env, main_budget_s=main_budget, runs={})
    save = lambda: (out / "summary.json").write_text(json.dumps(summary, indent=1))

    def stopped(s: dict) -> bool:
        "True (and noted in the summary) when a signal asked the script to stop."
        if s.get("stopped") in ("SIGTERM", "SIGINT"):
            _STOP.append(s["stopped"])
        if _STOP:
            summary["interrupted"] = _STOP[0]
            save()
            print(f"stopping: {_STOP[0]}", flush=True)
        return bool(_STOP)

    shape = {} if cpu_smoke else {"batch_size": 8, "seq_len": 256, "final_eval_batches": 4}
    smoke = train_one("smoke", {**abl_cfg, "max_steps": 20, "eval_every": 10, "eval_batches": 2, "time_budget": 0.0,
                                **shape}, out, data, preset="cpu-tiny")
    summary["smoke"] = smoke
    save()
    if "error" in smoke:
        print("smoke test failed: stopping", flush=True)
        return

    summary["runs"]["main"] = train_one("main", {**main_cfg, "time_budget": main_budget}, out, data, preset)
    save()
    if stopped(summary["runs"]["main"]):
        return
    if "error" not in summary["runs"]["main"]:
        try:
            summary["samples"] = samples(out / "main", device, 16 if cpu_smoke else 160)
        except Exception as e:
            traceback.print_exc()
            summary["samples"] = f"error: {type(e).__name__}: {e}"
        shutil.rmtree(out / "main" / sorted(p.name for p in (out / "main").glob("ckpt-*"))[-1], ignore_errors=True)
        save()

    overhead = 12.0     # per ablation, outside its budget: model build, full-split eval, checkpoint write and delete
    if stopped({}):
        return
    reserve = 100 if bench and not cpu_smoke else 5   # the throughput bench needs ~90 s at the end
    budget = min(abl_budget, (left() - reserve) / len(ABLATIONS) - overhead)
    summary["ablation_budget_s"] = budget
    if budget >= min(15, abl_budget):
        for name, ov in ABLATIONS.items():
            if stopped({}):
                return
            ov = {**ov, "first_k_dense_replace": n_layers} if "first_k_dense_replace" in ov else ov
            summary["runs"][f"abl_{name}"] = train_one(f"abl_{name}", {**abl_cfg, **ov, "time_budget": budget}, out,
                                                       data, preset)
            save()
            if stopped(summary["runs"][f"abl_{name}"]):
                return
    else:
        print(f"no time left for ablations ({left():.0f}s left)", flush=True)

    if bench and left() > 95 and not cpu_smoke and not _STOP:
        cmd = [sys.executable, str(ROOT / "bench/train_throughput.py"), "--out", str(out / "tp"),
               "--warmup", "4", "--steps", "12"]
        try:
            subprocess.run(cmd, check=True, timeout=left() - 5)
        except Exception as e:
            print(f"throughput bench: {type(e).__name__}: {e}", flush=True)
    else:
        print(f"skipping the throughput bench ({left():.0f}s left)", flush=True)
    summary["total_wall_s"] = time.time() - t_start
    save()


# ---------------------------------------------------------------- report (CPU)
def report(tar: str, dest: Path) -> None:
    "Unpack the GPU results (metrics, configs, summary, samples; no weights) into `dest`."
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            if m.isfile() and not m.name.endswith(".safetensors") and "/ckpt-" not in m.name:
                m.name = m.name.split("gpu_train/", 1)[-1]
                t.extract(m, dest, filter="data")
    print(sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--deb", required=True, help="dict-gcide .deb (apt-get download dict-gcide)")
    p.add_argument("--rebuild", action="store_true", help="extract GCIDE again even if /tmp/a2_gcide/docs exists")
    p.add_argument("--max-chunks", type=int, default=3000, help="4096-char chunks the tokenizer is trained on")
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "gpu_train"))
    r.add_argument("--deadline", type=float, default=530.0, help="seconds after start by which work must be done")
    r.add_argument("--main-budget", type=float, default=MAIN_BUDGET)
    r.add_argument("--abl-budget", type=float, default=ABL_BUDGET)
    r.add_argument("--no-bench", action="store_true", help="skip the throughput benchmark (a shorter GPU call)")
    r.add_argument("--cpu-smoke", action="store_true", help="tiny CPU dress rehearsal of `run` (no GPU)")
    q = sub.add_parser("report")
    q.add_argument("--tar", required=True)
    q.add_argument("--dest", default=str(ROOT / "results" / "gpu_train"))
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.deb, a.max_chunks, a.rebuild)
    elif a.cmd == "run":
        run(Path(a.out), a.deadline, a.main_budget, a.abl_budget, a.cpu_smoke, not a.no_bench)
    else:
        report(a.tar, Path(a.dest))


if __name__ == "__main__":
    main()
