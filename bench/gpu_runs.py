"""The GPU training run and its ablations (issue 8), in three steps: `prepare` (CPU), `run` (GPU), `report` (CPU).

    apt-get download dict-gcide python3.11-doc linux-doc-6.1 python3-sympy python3-pandas python3-scipy \
        python3-twisted python3-numpy python3-matplotlib python3-django perl-doc git-doc python-sqlalchemy-doc
    python bench/gpu_runs.py prepare --deb *.deb                      # the list is `DEBS`
    python bench/gpu_runs.py run --out $OUT/gpu_train --steps main    # on the GPU (one call per --steps group)
    python bench/gpu_runs.py report --tar main.tar.gz abl.tar.gz      # here: unpack into results/gpu_train/

Data: `prepare` is `dsv3_min.gpu_mix.prepare_mix` (notebook 26): the mix of the Debian packages' documents with
shakespeare and python-stdlib, its 16,384-id tokenizer and both splits packed, xz-compressed, into
`.device_carry/gpu_mix/` (git-ignored, ~35 MB; carry it to the GPU machine); `run` reads it back with
`gpu_mix.load_mix` and calls the `dsv3_min.train.train` of `python -m dsv3_min train`, with the CLI's presets and
`--set` overrides (its own `_configs`). The plan of the runs (`MAIN`, `ABL`, `ABLATIONS`, the budgets), the readers
of their metrics and the plots live in `dsv3_min.report` (notebook 27).

Runs (H200, bf16 autocast, torch.compile, batch 16 x 1024 tokens, gpu-small with a 16,384-id vocabulary, seed 0 so
every run sees the same batches; the cosine decay spans each run's time budget, cold compile included): `main`
(`MAIN_BUDGET` s, then samples), the `ablations` of `ABLATIONS` (`ABL_BUDGET` s each; notebook 27 says what each
changes) and `bench` (bench/train_throughput.py, if ~95 s remain). `run` starts no work that could not end by
`--deadline` (seconds after its start; default 595, inside the 10-minute limit per device command): the main run's
budget shrinks to leave `MAIN_OVERHEAD` for its evaluation and samples, the ablations share what is left. SIGTERM
ends the current run after its step and starts nothing new; `report` rebuilds the summary of a run cut off before
writing its own. One device call per group of steps; on an `nvidia-h200-x2`, one process per GPU in the same call
(CONTRIBUTING.md, "GPU work", has the command).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from dsv3_min.__main__ import _configs
from dsv3_min.checkpoint import load_trained
from dsv3_min.config import count_params
from dsv3_min.files import atomic_write, write_json
from dsv3_min.gpu_mix import DEBS, load_mix, prepare_mix
from dsv3_min.infer import sample_text
from dsv3_min.report import (
    ABL,
    ABL_BUDGET,
    ABLATIONS,
    MAIN,
    MAIN_BUDGET,
    PRESET,
    VOCAB,
    metrics_summary,
    unpack_results,
)
from dsv3_min.train import TrainData, train

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".device_carry" / "gpu_mix"
MAIN_OVERHEAD = 75.0  # the main run's wall-clock beyond its budget, as measured on the H200: loading the data, the
#                       whole-split evaluation and the checkpoint (~46 s), then the samples (~19 s)
PROMPTS = ["ROMEO.\n", "def fibonacci(n):\n", "Love \\Love\\, n.", "The king"]
DOCS = Path("/tmp/a2_docs")   # the extracted Debian documents, one folder per part (never committed)


def prepare(debs: list[str], max_chunks: int, rebuild: bool = False) -> None:
    "`gpu_mix.prepare_mix` into `CARRY`; its counts (no text) also go to results/gpu_train/data.json (committed)."
    t0 = time.time()
    meta = prepare_mix(debs, CARRY, DOCS, VOCAB, max_chunks, cache_dir=Path("/tmp/a2_cache"), rebuild=rebuild)
    write_json(ROOT / "results" / "gpu_train" / "data.json", meta)
    print(json.dumps(meta, indent=1), f"{time.time() - t0:.1f}s", flush=True)

def load_data(carry: Path = CARRY, unzip_dir: Path = Path("/tmp/a2_tokens")):
    "The carried mix of `prepare` as (TrainData, meta)."
    tok, train_tokens, val_tokens, meta = load_mix(carry, unzip_dir)
    return TrainData(tok, train_tokens, val_tokens, meta["val"]["tokens"] / meta["val"]["bytes"]), meta


def train_one(name: str, overrides: dict, out: Path, data, preset: str = PRESET) -> dict:
    "One run of `dsv3_min.train.train`; returns its summary (or the error), never raises."
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
        s = {**metrics_summary(out / name), "overrides": overrides, "stopped": r.stopped,
             "train_s": round(r.seconds, 1), "wall_s": round(time.time() - t0, 1), "final_val_loss": r.val_loss,
             "final_val_bpb": r.val_bpb,
             "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
             "params": dict(total=pc.total, active=pc.active, mtp=pc.mtp)}
        s.pop("rebuilt_from_metrics")
    except Exception as e:  # keep going: the other runs still count
        traceback.print_exc()
        s = dict(name=name, overrides=overrides, error=f"{type(e).__name__}: {e}", wall_s=round(time.time() - t0, 1))
    for ck in (out / name).glob("ckpt-*") if name != "main" else []:
        shutil.rmtree(ck)                                   # weights stay on the machine (and out of git)
    print(json.dumps(s), flush=True)
    return s


def samples(run_dir: Path, device: str, n_tokens: int = 160) -> list[dict]:
    "Continuations of `PROMPTS` from the run's final checkpoint (temperature 0.8, top-k 50, seed 0)."
    model, tok = load_trained(run_dir, device)
    return [dict(prompt=p, temperature=0.8, top_k=50, seed=0,
                 text=sample_text(model, tok, p, n_tokens, 0.8, 50, None, 0)) for p in PROMPTS]


_STOP: list[str] = []  # set by SIGTERM/SIGINT: finish the current step's bookkeeping, start nothing new


def _on_signal(signum, frame) -> None:
    _STOP.append(signal.Signals(signum).name)


STEPS = ("smoke", "main", "ablations", "bench")


def run(out: Path, deadline_s: float, main_budget: float = MAIN_BUDGET, abl_budget: float = ABL_BUDGET,
        cpu_smoke: bool = False, steps: tuple[str, ...] = STEPS, ablations: tuple[str, ...] = tuple(ABLATIONS)) -> None:
    """`steps` of: smoke test, main run, `ablations` (names in `ABLATIONS`), throughput bench; starts no work that
    could not end by `deadline_s`. One process per GPU: `CUDA_VISIBLE_DEVICES=1 ... --ablations base,dense`."""
    # every run compiles cold, so equal budgets hold equal compile work (read at inductor's first import)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
    for sig in (signal.SIGTERM, signal.SIGINT):  # `train` handles them during a run; between runs they land here
        signal.signal(sig, _on_signal)
    preset, device = ("cpu-tiny", "cpu") if cpu_smoke else (PRESET, "cuda")
    tiny = {"device": "cpu", "batch_size": 2, "seq_len": 64, "threads": 1, "final_eval_batches": 2}  # CPU rehearsal
    main_cfg = {**MAIN, **tiny, "compile": False} if cpu_smoke else MAIN
    abl_cfg = {**ABL, **tiny, "compile": False} if cpu_smoke else ABL
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
    summary = dict(env=env, steps=list(steps), runs={})
    save = lambda: atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    bench = "bench" in steps

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
    if "smoke" in steps:
        summary["smoke"] = smoke = train_one("smoke", {**abl_cfg, "max_steps": 20, "eval_every": 10, "eval_batches": 2,
                                                       "time_budget": 0.0, **shape}, out, data, preset="cpu-tiny")
        save()
        if "error" in smoke:
            print("smoke test failed: stopping", flush=True)
            return

    if "main" in steps:
        if main_budget > left() - MAIN_OVERHEAD and not cpu_smoke:   # leave time for its evaluation and samples
            print(f"main budget {main_budget:.0f}s cut to {left() - MAIN_OVERHEAD:.0f}s by --deadline", flush=True)
            main_budget = max(0.0, left() - MAIN_OVERHEAD)
        summary["main_budget_s"] = main_budget
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

    if stopped({}):
        return
    if "ablations" in steps:
        overhead = 30.0     # per ablation, outside its budget: build, full-split evaluation, checkpoint
        reserve = 100 if bench and not cpu_smoke else 5   # the throughput bench needs ~90 s at the end
        budget = min(abl_budget, (left() - reserve) / max(1, len(ablations)) - overhead)
        summary["ablation_budget_s"] = budget
        if budget < min(15, abl_budget):
            print(f"no time left for ablations ({left():.0f}s left)", flush=True)
            ablations = ()
        for name in ablations:
            if stopped({}):
                return
            ov = ABLATIONS[name]
            ov = {**ov, "first_k_dense_replace": n_layers} if "first_k_dense_replace" in ov else ov
            summary["runs"][f"abl_{name}"] = train_one(f"abl_{name}", {**abl_cfg, **ov, "time_budget": budget}, out,
                                                       data, preset)
            save()
            if stopped(summary["runs"][f"abl_{name}"]):
                return

    if bench and left() > 95 and not cpu_smoke and not _STOP:
        cmd = [sys.executable, str(ROOT / "bench/train_throughput.py"), "--out", str(out / "tp"), "--deadline",
               str(left() - 15)]
        try:
            subprocess.run(cmd, check=True, timeout=left() - 5)
        except Exception as e:
            print(f"throughput bench: {type(e).__name__}: {e}", flush=True)
    else:
        print(f"skipping the throughput bench ({left():.0f}s left)", flush=True)
    summary["total_wall_s"] = time.time() - t_start
    save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--deb", required=True, nargs="+", help=f"the .deb files of `apt-get download {' '.join(DEBS)}`")
    p.add_argument("--rebuild", action="store_true", help=f"extract the .deb files again even if {DOCS} holds them")
    p.add_argument("--max-chunks", type=int, default=3000, help="4096-char chunks the tokenizer is trained on")
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "gpu_train"))
    r.add_argument("--deadline", type=float, default=595.0, help="seconds after start by which work must be done")
    r.add_argument("--main-budget", type=float, default=MAIN_BUDGET)
    r.add_argument("--abl-budget", type=float, default=ABL_BUDGET)
    r.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    r.add_argument("--ablations", default=",".join(ABLATIONS), help="comma-separated subset of the ablations")
    r.add_argument("--cpu-smoke", action="store_true", help="tiny CPU dress rehearsal of `run` (no GPU)")
    q = sub.add_parser("report")
    q.add_argument("--tar", required=True, nargs="+", help="the tarballs of one or more `run` calls; "
                   "`x.tar.gz=NAME` renames that call's main run to NAME")
    q.add_argument("--dest", default=str(ROOT / "results" / "gpu_train"))
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.deb, a.max_chunks, a.rebuild)
    elif a.cmd == "run":
        steps, abl = (tuple(x for x in v.split(",") if x) for v in (a.steps, a.ablations))
        for flag, got, known in (("--steps", steps, STEPS), ("--ablations", abl, tuple(ABLATIONS))):
            if set(got) - set(known):
                ap.error(f"{flag}: unknown {sorted(set(got) - set(known))}; choose from {','.join(known)}")
        run(Path(a.out), a.deadline, a.main_budget, a.abl_budget, a.cpu_smoke, steps, abl)
    else:  # report: the tarballs unpacked into `dest`, summary merged, plots drawn
        unpack_results(a.tar, Path(a.dest))
        print(sorted(str(p.relative_to(a.dest)) for p in Path(a.dest).rglob("*") if p.is_file()))


if __name__ == "__main__":
    main()
