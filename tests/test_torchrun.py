"""`torchrun --nproc-per-node 2 -m dsv3_min train --set ep=2` on CPU (gloo), with a TINY config (NOT a real model
size): per-step losses equal the single-process run, rank 0 alone writes, the gathered checkpoint is the ordinary one
(`from_pretrained`, `sample`), a SIGKILLed torchrun run resumes at ep=2 and at ep=1 with the unbroken run's losses, and
bad setups fail in one line before anything is written."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from _tiny_run import losses, tiny_corpus_fixture, train_argv  # noqa: F401

from dsv3_min import from_pretrained
from dsv3_min.__main__ import main
from dsv3_min.hf import checkpoint_problem, list_checkpoints
from dsv3_min.train import read_metrics

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
# About 10x the worst relative difference measured against the single-process run (CPU, gloo, torch 2.13): per-step
# losses 6.4e-8 (validation 0, resumed at ep=1 6.4e-8), checkpoint weights 1.2e-6 (relative norm per tensor).
LOSS_TOL, WEIGHT_TOL = 7e-7, 1.2e-5


def _args(corpus, out, *extra):
    """The `train` command line of every run here: TINY, 8 steps, CPU, AdamW (the torchrun runs add `--set ep=2`).
    AdamW, not the cpu-tiny preset's Muon: the tolerances above were measured with it; Muon's bf16 Newton-Schulz turns
    the ~1e-7 differences of sharded sums into bf16 roundings (1.2e-5 after 8 steps), and its own test
    (`test_optim.test_muon_under_torchrun_ep2_matches_single_process`) holds it to its own measured error."""
    return train_argv(corpus, "--out", str(out), "--max-steps", str(STEPS), "--set", "device=cpu", "optimizer=adamw",
                      *extra)


def _torchrun(args, nproc=2, slow_save=0.0) -> subprocess.Popen:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 -m dsv3_min ARGS`, in its own session; with
    `slow_save`, the workers run tests/_slow_save.py instead (every checkpoint write slowed by that many seconds)."""
    entry = [str(ROOT / "tests" / "_slow_save.py"), str(slow_save)] if slow_save else ["-m", "dsv3_min"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *entry, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _tree(pid: int) -> list[int]:
    "`pid` and all its descendants (from /proc): torchrun starts each worker in a session of its own."
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill(p: subprocess.Popen) -> None:
    "SIGKILL torchrun and every worker it started."
    for pid in _tree(p.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(p: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    "Wait for a torchrun to end: its (stdout, stderr); past `timeout`, kill it all and fail."
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(p)
        p.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """The single-process run (in this process): 8 steps, a checkpoint every 4."""
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(_args(tiny_corpus, run, "ckpt_every=4")) == 0
    return run


@pytest.fixture(scope="module")
def ep2(tiny_corpus, reference, tmp_path_factory):
    """The same run under torchrun, 2 gloo ranks, ep=2 (2 of the 4 experts per rank): (run dir, stdout, stderr)."""
    run = tmp_path_factory.mktemp("ep2") / "run"
    p = _torchrun(_args(tiny_corpus, run, "ckpt_every=4", "ep=2"))
    out, err = _finish(p)
    assert p.returncode == 0, err[-3000:]
    return run, out, err


def test_torchrun_ep2_matches_single_process_and_writes_once(tiny_corpus, reference, ep2, capsys):
    """Under torchrun (2 ranks, ep=2) every step's loss (and each validation loss) equals the single-process run's
    within `LOSS_TOL` relative (fp32, same global batches); metrics.jsonl has each step once and only rank 0 printed;
    the gathered checkpoint is the ordinary one: its weights equal the single-process checkpoint's (per tensor,
    `WEIGHT_TOL` in relative norm), `from_pretrained` reads it and `sample` continues a prompt from it."""
    run, out, err = ep2
    one, two = read_metrics(reference), read_metrics(run)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    worst = max(_rel(b["loss"], a["loss"]) for a, b in zip(one, two))
    assert worst <= LOSS_TOL, f"worst relative loss difference {worst:.2e} > {LOSS_TOL} (measured before: 6.4e-8)"
    vals = [(a["val_loss"], b["val_loss"]) for a, b in zip(one, two) if "val_loss" in a]
    assert len(vals) == 2 and all(_rel(b, a) <= LOSS_TOL for a, b in vals), (vals, "measured before: identical")
    assert out.count("preset cpu-tiny:") == 1 and out.count("done at step 8") == 1, out
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000004", "ckpt-0000008", "metrics.jsonl", "summary.json",
                                                    "train_config.json"]
    ours, ref = from_pretrained(run / "ckpt-0000008"), from_pretrained(reference / "ckpt-0000008")
    sd = ref.state_dict()
    w = max(float((t - sd[n]).norm() / sd[n].norm().clamp(min=1e-30)) for n, t in ours.state_dict().items())
    assert w <= WEIGHT_TOL, f"checkpoint weights differ by {w:.2e} > {WEIGHT_TOL} (measured before: 1.2e-6)"
    assert main(["sample", "--ckpt", str(run), "--prompt", "The king", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("The king")
    print(f"torchrun ep=2 vs one process: worst relative loss difference {worst:.2e}, validation "
          f"{max(_rel(b, a) for a, b in vals):.2e}, weights {w:.2e}")


def test_torchrun_sigkill_then_resume_at_ep2_and_ep1(tiny_corpus, reference, ep2, tmp_path):
    """A torchrun ep=2 run (every checkpoint write slowed by 1 s) is SIGKILLed, agent and both workers, while its second
    checkpoint is being written: the first checkpoint is intact and the log holds steps 1-4 once. Resumed under torchrun
    at ep=2 it logs exactly the unbroken torchrun run's losses (bit for bit); a copy resumed by one process (ep=1) logs
    the single-process run's losses within `LOSS_TOL` relative."""
    cut = tmp_path / "cut"
    p = _torchrun(_args(tiny_corpus, cut, "ckpt_every=2", "ep=2"), slow_save=1)
    t0 = time.time()
    while not any(x.name.startswith(".ckpt-0000004.tmp-") for x in (cut.iterdir() if cut.exists() else [])):
        assert p.poll() is None and time.time() - t0 < 240, "no second checkpoint write seen"
        time.sleep(0.02)
    _kill(p)
    _finish(p, 60)
    assert [c.name for c in list_checkpoints(cut)] == ["ckpt-0000002"] and checkpoint_problem(cut / "ckpt-0000002") is None
    assert [s for s, _ in losses(cut)] == [1, 2, 3, 4]
    shutil.copytree(cut, tmp_path / "cut1")
    r = _torchrun(_args(tiny_corpus, cut, "ckpt_every=2", "ep=2", "--resume"))
    _, err = _finish(r)
    assert r.returncode == 0, err[-3000:]
    assert losses(cut) == losses(ep2[0])  # exact, step by step
    assert main(_args(tiny_corpus, tmp_path / "cut1", "ckpt_every=2", "--resume")) == 0  # one process, ep=1
    got, ref = losses(tmp_path / "cut1"), losses(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    worst = max(_rel(b, a) for (_, a), (_, b) in zip(ref, got))
    assert worst <= LOSS_TOL, f"worst relative loss difference {worst:.2e} > {LOSS_TOL} (measured before: 6.4e-8)"
    print(f"ep=2 checkpoint resumed by one process: worst relative loss difference {worst:.2e}")


@pytest.mark.parametrize("env, sets, message", [
    ({}, ["ep=2"], "ep=2 needs one process per rank: launch with `torchrun"),
    ({"WORLD_SIZE": "3"}, ["ep=3"], "n_routed_experts=4 is not divisible by ep=3"),
    ({"WORLD_SIZE": "3"}, ["ep=2"], "world size 3 is not divisible by ep=2"),
    ({"WORLD_SIZE": "4"}, ["ep=2"], "batch_size=2 is not divisible by the world size 4"),
])
def test_bad_parallel_setups_are_one_line_before_anything_starts(tiny_corpus, tmp_path, monkeypatch, capsys, env,
                                                                 sets, message):
    """ep > 1 without torchrun, n_routed_experts % ep, world size % ep and batch % world (torchrun's WORLD_SIZE set
    as it would be, for this process) each exit with code 2 and one stderr line naming the numbers; no run directory
    is created and no process group is started."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    assert main(_args(tiny_corpus, run, *sets)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3: error: ") and err.count("\n") == 1 and message in err, err
    assert not run.exists() and not dist.is_initialized()


def test_bad_setup_under_real_torchrun_prints_one_line(tiny_corpus, tmp_path):
    """Under a real torchrun (2 ranks) with ep=4: both workers exit with code 2 before any process group or file
    exists, and the only `dsv3: error:` line on stderr is rank 0's, naming the world size and ep."""
    run = tmp_path / "run"
    p = _torchrun(_args(tiny_corpus, run, "ep=4"))
    _, err = _finish(p)
    assert p.returncode != 0
    lines = [ln for ln in err.splitlines() if "dsv3: error:" in ln]
    assert lines == ["dsv3: error: world size 2 is not divisible by ep=4"], err[-3000:]
    assert set(re.findall(r"exitcode\s*:\s*(\d+)", err)) == {"2"}, err[-3000:]  # torchrun reports the workers
    assert not run.exists()


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tiny_corpus, tmp_path):
    """SIGTERM sent to rank 1 alone (one worker, not torchrun) once step 3 is logged: the ranks agree on it after each
    step, so both stop after the same step N (rank 0 never got the signal), rank 0 writes checkpoint N (intact, the
    last logged step) and a summary saying SIGTERM, and both workers exit with 143 instead of hanging in a collective."""
    run = tmp_path / "run"
    p = _torchrun(train_argv(tiny_corpus, "--out", str(run), "--max-steps", "400", "--set", "device=cpu", "ep=2",
                             "eval_every=1000"))
    try:
        t0 = time.time()
        while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 3:
            assert p.poll() is None and time.time() - t0 < 240, "step 3 never logged"
            time.sleep(0.02)
        rank = {}
        for pid in _tree(p.pid)[1:]:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
            rank[env.get("RANK")] = pid
        os.kill(rank["1"], signal.SIGTERM)
        out, err = _finish(p, 120)
    finally:
        if p.poll() is None:
            _kill(p)
    n = read_metrics(run)[-1]["step"]
    assert 3 <= n < 400 and f"SIGTERM at step {n} " in out, out
    assert [c.name for c in list_checkpoints(run)] == [f"ckpt-{n:07d}"] and checkpoint_problem(run / f"ckpt-{n:07d}") is None
    assert json.loads((run / "summary.json").read_text())["stopped"] == "SIGTERM"
    assert set(re.findall(r"exitcode\s*:\s*(\d+)", err)) == {"143"}, err[-3000:]
