"""CPU threads on a busy machine: the training loop users run (`python -m dsv3_min train --preset cpu-tiny`) for a
fixed time budget with `threads=1`, `threads=<all cores>` (torch's default on this machine) and `threads=0` (the
default: `train.probe_threads`), each alone and then beside one busy loop (a `while True: pass` process holding a core).

Reported per case: optimizer steps done in the budget and the median tokens/s of the loop's own clock
(metrics.jsonl, step 2 on: the first step warms up); for `threads=0`, the thread counts the probe chose. The machine's
1-minute load average before each case is recorded (a shared machine is never idle).

    python bench/threads_busy.py --out results/threads_busy.json --seconds 20
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsv3_min.threads import usable_cores


def run_case(threads: int, seconds: float, busy: bool) -> dict:
    "One training run of `seconds` with `threads`, beside a busy loop or not."
    load = os.getloadavg()[0]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(1.0 if busy else 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "dsv3_min", "train", "--preset", "cpu-tiny", "--out", str(out), "--no-progress",
                   "--time-budget", str(seconds), "--set", f"threads={threads}", "eval_every=100000", "eval_batches=1",
                   "final_eval_batches=1", "ckpt_every=0"]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    tok_s = [r["tokens_per_s"] for r in recs[1:]] or [recs[-1]["tokens_per_s"]]
    return dict(threads=threads, busy_loop=busy, steps=len(recs), median_tokens_per_s=statistics.median(tok_s),
                probed=sorted({r["threads"] for r in recs if "threads" in r}), load_avg_1min_before=load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    cores = usable_cores()
    cases = [run_case(t, a.seconds, busy) for busy in (False, True) for t in (1, cores, 0)]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(cores=cores, seconds=a.seconds, cases=cases,
                                           command=" ".join(["python", "bench/threads_busy.py", *sys.argv[1:]])),
                                      indent=1) + "\n")
    for c in cases:
        print(c)


if __name__ == "__main__":
    main()
