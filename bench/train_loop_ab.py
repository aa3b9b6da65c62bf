"""The training loop's speed at two versions of the package, side by side: `python -m dsv3_min train` run from each
package root in turn (A, B, A, B, ...), the same preset, corpus, steps and settings; tokens/s per step from each run's
metrics.jsonl (the loop's own clock: forward, backward, clip, optimizer step, router update, CUDA synchronized).

    git archive <old commit> dsv3_min | tar -x -C old/      # the package as it was
    python bench/train_loop_ab.py --a old --b . --corpus plays/ --steps 150 --reps 2 --out results/train_loop_ab.json

Reported per run: the median tokens/s over the steps after `--skip` (compilation and warm-up) and without
evaluation steps; per side the median over its runs; and the ratio B/A. Runs that write checkpoints or evaluate
only at the end, so the timed steps are the loop alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsv3_min.files import atomic_write  # noqa: E402


def one_run(root: Path, args, run_dir: Path) -> dict:
    "Train once with the package under `root`; the median tokens/s of its timed steps."
    cmd = [sys.executable, "-m", "dsv3_min", "train", "--preset", args.preset, "--corpus",
           str(Path(args.corpus).resolve()), "--out", str(run_dir), "--max-steps", str(args.steps), "--no-progress",
           "--set", f"ckpt_every={args.steps}", f"eval_every={args.steps}", *args.set]
    env = {**os.environ, "PYTHONPATH": str(root.resolve())}
    subprocess.run(cmd, check=True, cwd=root, env=env)  # cwd first on sys.path: this root's dsv3_min
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if r["step"] > args.skip and "val_loss" not in r]
    return {"median_tokens_per_s": statistics.median(tps), "timed_steps": len(tps),
            "losses": [r["loss"] for r in rows]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="package root A (holds dsv3_min/)")
    ap.add_argument("--b", default=".", help="package root B")
    ap.add_argument("--preset", default="gpu-small")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--skip", type=int, default=20, help="first steps left out of the timing")
    ap.add_argument("--reps", type=int, default=2, help="runs per side, interleaved A, B, A, B")
    ap.add_argument("--set", nargs="*", default=["compile=true"], help="extra FIELD=VALUE for both sides")
    ap.add_argument("--out", default="results/train_loop_ab.json")
    args = ap.parse_args(argv)
    runs = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.reps):
            for side in ("a", "b"):
                r = one_run(Path(getattr(args, side)), args, Path(tmp) / f"{side}{i}")
                print(f"{side}{i}: {r['median_tokens_per_s']:,.0f} tok/s", flush=True)
                runs[side].append(r)
    med = {s: statistics.median(r["median_tokens_per_s"] for r in runs[s]) for s in runs}
    out = {"preset": args.preset, "steps": args.steps, "skip": args.skip, "settings": args.set,
           "a": args.a, "b": args.b, "runs": runs, "median_tokens_per_s": med, "ratio_b_over_a": med["b"] / med["a"]}
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out["torch"] = torch.__version__
    atomic_write(Path(args.out), json.dumps(out, indent=1) + "\n")
    print(f"B/A = {out['ratio_b_over_a']:.3f} ({med['b']:,.0f} / {med['a']:,.0f} tok/s)")


if __name__ == "__main__":
    main()
