"""Fault injection (issue 14): training processes SIGKILLed at moments drawn from a seeded RNG, some inside a
checkpoint write (slowed down by patching the checkpoint writer in the child: `tests/_slow_save.py`), and checkpoint writes
that fail like a full disk. Every resume must succeed and reproduce the unbroken run's per-step losses bit for bit.
The model is tiny (NOT a real model size) so that the whole file runs in well under a minute."""
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from _slow_save import slow_saves
from _tiny_run import Child, logged_steps, losses, tiny_corpus_fixture, train_argv  # noqa: F401

from dsv3_min.__main__ import main
from dsv3_min.checkpoint import load_trained
from dsv3_min.hf import checkpoint_problem, latest_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
STEPS = 48
KILLS = 12


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """Per-step losses of the unbroken 48-step run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_argv(tiny_corpus, "--out", str(run), "--max-steps", str(STEPS))) == 0
    return losses(run)


def _temps(run: Path) -> list[str]:
    "Hidden temporaries of unfinished checkpoint writes (or deletions) in `run`."
    return [p.name for p in run.iterdir() if p.name.startswith(".ckpt-")] if run.exists() else []


def _intact(run: Path) -> Path | None:
    "The newest intact checkpoint (warnings about broken ones silenced: there must be none)."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return latest_checkpoint(run)


def test_sigkill_at_random_moments_then_resume_reproduces_losses(tiny_corpus, tmp_path, reference):
    """12 training processes are SIGKILLed, each after a delay drawn from random.Random(14) (0.05-0.45 s), while
    every checkpoint write (one per step) is slowed by 0.1 s inside the write: kills land inside writes, between
    them, in start-up and in the metrics append. After each kill every existing checkpoint is intact and the log has
    each step once; every restart (--resume when a checkpoint exists) succeeds; the finished run's per-step losses
    equal the unbroken run's exactly."""
    run, rng = tmp_path / "run", random.Random(14)
    slow = lambda: slow_saves(0.1)  # noqa: E731  (the write in progress is then visible as a temp dir)
    argv = train_argv(tiny_corpus, "--out", str(run), "--max-steps", str(STEPS), "--ckpt-every", "1")
    kills, inside_save = 0, 0
    while kills < KILLS:
        child = Child(argv + (["--resume"] if _intact(run) else []), setup=slow)
        deadline = time.time() + rng.uniform(0.05, 0.45)
        while child.alive() and time.time() < deadline:
            time.sleep(0.005)
        if not child.alive():
            break  # the run finished before this kill: fewer kills (asserted below)
        assert child.kill() == -signal.SIGKILL
        kills += 1
        inside_save += any(".tmp-" in t for t in _temps(run))
        assert all(checkpoint_problem(c) is None for c in list_checkpoints(run))
        steps = logged_steps(run)
        assert steps == list(range(1, len(steps) + 1))
    assert kills >= 10 and inside_save >= 2, (kills, inside_save)
    final = Child(argv + ["--resume"] if _intact(run) else argv)  # the last restart, at full speed
    assert final.wait() == 0
    assert losses(run) == reference  # exact float equality, step by step
    assert not _temps(run)  # the saves after the crashes removed every leftover


def test_sigkill_of_a_real_process_inside_a_save(tiny_corpus, tmp_path, reference):
    """A real `python -m dsv3_min train` process (launched by tests/_slow_save.py, every checkpoint write slowed by
    1 s) is SIGKILLed as soon as its second checkpoint write is in progress (its temp folder exists): the first checkpoint is intact, the half-written one is not under
    a real name, and --resume finishes the run with exactly the unbroken run's losses."""
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_slow_save.py"), "1",
                          *train_argv(tiny_corpus, "--out", str(run), "--max-steps", str(STEPS), "--ckpt-every", "2")],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    t0 = time.time()
    while not any(t.startswith(".ckpt-0000004.tmp-") for t in _temps(run)):
        assert p.poll() is None and time.time() - t0 < 120, "no second checkpoint write seen"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert [c.name for c in list_checkpoints(run)] == ["ckpt-0000002"] and checkpoint_problem(run / "ckpt-0000002") is None
    assert main(train_argv(tiny_corpus, "--out", str(run), "--max-steps", str(STEPS), "--ckpt-every", "2",
                           "--resume")) == 0
    assert losses(run) == reference


def test_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(tiny_corpus, tmp_path, reference, capsys,
                                                                          monkeypatch):
    """A checkpoint write that fails like a full disk (the optimizer file's write stores half its bytes, then raises
    OSError 28) stops the run with exit code 1 and ONE stderr line naming the step and the last intact checkpoint; no
    temporary is left, the previous checkpoint loads, and --resume reproduces the unbroken run's losses."""
    import dsv3_min.checkpoint as ck
    real = ck.save_file

    def half_then_enospc(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    run = tmp_path / "run"
    argv = train_argv(tiny_corpus, "--out", str(run), "--max-steps", str(STEPS), "--ckpt-every", "3")
    calls = []

    def second_save_fails(*a, **k):  # save_file writes optimizer.safetensors, once per checkpoint
        calls.append(1)
        return (half_then_enospc if len(calls) == 2 else real)(*a, **k)

    monkeypatch.setattr(ck, "save_file", second_save_fails)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsv3: error: could not write the checkpoint of step 6")
    assert "No space left on device" in err and f"the last intact checkpoint is {run / 'ckpt-0000003'}" in err
    assert sorted(p.name for p in run.iterdir() if "ckpt" in p.name) == ["ckpt-0000003"]
    model, _ = load_trained(run)
    assert torch.isfinite(model.embed_tokens.weight).all()
    monkeypatch.setattr(ck, "save_file", real)
    assert main(argv + ["--resume"]) == 0
    assert losses(run) == reference


def test_partial_metrics_line_is_dropped_with_one_warning_on_resume(tiny_corpus, tmp_path, reference, capsys):
    """A crash in the middle of a metrics append leaves half a line: --resume drops it with a one-line warning that
    names metrics.jsonl, rewrites the log atomically, and continues exactly."""
    run = tmp_path / "run"
    argv = train_argv(tiny_corpus, "--out", str(run), "--max-steps", str(STEPS), "--ckpt-every", "4", "--set",
                      "stop_at=4")
    assert main(argv) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')
    capsys.readouterr()
    assert main(train_argv(tiny_corpus, "--out", str(run), "--max-steps", str(STEPS), "--resume")) == 0
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and warn[0].startswith("dsv3: warning: ") and "metrics.jsonl" in warn[0]
    assert losses(run) == reference
