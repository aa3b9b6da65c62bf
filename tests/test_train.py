"""Tests of dsv3_min.train: TrainConfig validation, --set parsing (the CLI's), exact resume, stopping, summary.json,
compilation, and the loop reused on a model built elsewhere."""
import dataclasses
import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from _tiny_run import TINY_SET, Child, freeze_at, losses, tiny_corpus_fixture, train_argv, wait_for_step  # noqa: F401
from safetensors.torch import load_file

from dsv3_min.__main__ import main
from dsv3_min.checkpoint import load_checkpoint
from dsv3_min.cli import split_overrides
from dsv3_min.hf import list_checkpoints
from dsv3_min.model import DeepSeekV3
from dsv3_min.optim import make_optimizer
from dsv3_min.step import lm_loss
from dsv3_min.train import TrainConfig, read_metrics, train_config_for, train_loop

ROOT = Path(__file__).resolve().parent.parent


def test_split_overrides_types_and_errors():
    """--set values parse as JSON/Python literals (ints stay ints until a float field converts them), unknown names
    name the closest field and list both configs' fields."""
    m, t = split_overrides(["hidden_size=32", "lr=1", "compile=true", "q_lora_rank=None", "corpus=/tmp/x",
                            'rope_scaling={"type": "yarn", "factor": 2, "original_max_position_embeddings": 64}'])
    assert m == {"hidden_size": 32, "q_lora_rank": None, "rope_scaling": {"type": "yarn", "factor": 2,
                                                                          "original_max_position_embeddings": 64}}
    assert t == {"lr": 1, "compile": True, "corpus": "/tmp/x"}
    tc = train_config_for("cpu-tiny", **t)
    assert isinstance(tc.lr, float) and tc.lr == 1.0
    with pytest.raises(ValueError, match="unknown field 'hiddn_size' in --set; did you mean 'hidden_size'.*max_steps"):
        split_overrides(["hiddn_size=3"])
    with pytest.raises(ValueError, match="name=value"):
        split_overrides(["lr"])
    with pytest.raises(ValueError, match="unknown preset 'nope'.*cpu-tiny"):
        train_config_for("nope")


@pytest.mark.parametrize("field, value, why", [
    ("batch_size", 0, "must be a positive integer"), ("batch_size", 2.5, "must be a positive integer"),
    ("batch_size", "2", "must be a positive integer"), ("warmup", -1, "must be a non-negative integer"),
    ("lr", "abc", "must be a float > 0"), ("lr", float("nan"), "must be a float > 0"),
    ("lr", float("inf"), "must be a float > 0"), ("lr", 0.0, "must be a float > 0"),
    ("beta2", 1.5, r"must be a float in \[0, 1\]"), ("grad_clip", -1.0, "must be a float >= 0"),
    ("compile", "yes", "must be true or false"), ("compile", 1, "must be true or false"),
    ("device", "banana", "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"), ("device", "cuda:x", "must be .auto.*cuda:N"),
    ("device", 0, "must be a string"), ("dtype", "fp16", "must be one of .*auto"),
    ("corpus", "", "must be a non-empty string"), ("seed", True, "must be a non-negative integer"),
    ("ep", 0, "must be a positive integer"), ("ep", 1.5, "must be a positive integer"),
])
def test_train_config_rejects_wrong_types_and_ranges(field, value, why):
    """Every TrainConfig field is checked by type and range in the constructor, naming the field and the value:
    bools accept only True/False, ints refuse floats, strings and bools, floats must be finite, devices must parse."""
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}=.*: {why}"):
        TrainConfig(**{field: value})


def test_train_config_from_dict_names_unknown_keys_and_converts_ints():
    """A config dict (train_config.json, state.json) with a typo names the closest field; valid devices pass; an int
    for a float field becomes a float."""
    with pytest.raises(ValueError, match=r"unknown TrainConfig field 'max_step' \(did you mean 'max_steps'\?\)"):
        TrainConfig.from_dict({"max_step": 3})
    for dev in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert TrainConfig(device=dev).device == dev
    tc = TrainConfig.from_dict({"lr": 1, "time_budget": 5})
    assert (tc.lr, tc.time_budget) == (1.0, 5.0) and isinstance(tc.time_budget, float)


# ----- end to end, through the command line, on a tiny corpus (the config is tiny: NOT a real model size) -----
def test_resume_after_sigkill_reproduces_losses_exactly(tiny_corpus, tmp_path):
    """A 12-step run, and a run checkpointing every 3 steps whose process is frozen after step 7 (an `on_step`
    callback), SIGKILLed, and resumed to 12, log bit-identical per-step losses (and the resumed log has each step
    once)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(train_argv(tiny_corpus, "--out", str(full), "--max-steps", "12")) == 0
    child = Child(train_argv(tiny_corpus, "--out", str(cut), "--max-steps", "12", "--ckpt-every", "3"),
                  on_step=freeze_at(7))
    wait_for_step(cut, 7, child.alive)
    assert child.kill() == -signal.SIGKILL
    assert sorted(c.name for c in cut.glob("ckpt-*")) == ["ckpt-0000003", "ckpt-0000006"]
    assert [s for s, _ in losses(cut)] == list(range(1, 8))
    assert main(train_argv(tiny_corpus, "--out", str(cut), "--max-steps", "12", "--ckpt-every", "3", "--resume")) == 0
    a, b = losses(full), losses(cut)
    assert [s for s, _ in a] == list(range(1, 13))
    assert a == b  # exact float equality, step by step
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 2 * 16 and summary["stopped"] == "done"
    assert summary["val_bits_per_byte"] == read_metrics(cut)[-1]["val_bits_per_byte"] > 0
    assert summary["machine"]["torch"] == torch.__version__ and summary["machine"]["device"] == "cpu"
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["seconds"], rel=1e-3)


def test_sigterm_saves_a_checkpoint_and_resume_errors(tiny_corpus, tmp_path, capsys):
    """SIGTERM mid-run (sent by an on_step callback after step 5) saves a checkpoint at that step and exits 143;
    --resume with no checkpoint, or with a different model config, a new run into a directory that holds one, and
    --out naming a file, are one-line errors naming the problem."""
    run = tmp_path / "run"
    sigterm_at_5 = lambda step, rec: step == 5 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    assert main(train_argv(tiny_corpus, "--out", str(run), "--max-steps", "12"), on_step=sigterm_at_5) == 143
    assert (run / "ckpt-0000005" / "model.safetensors").exists() and "SIGTERM at step 5" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    cases = [((str(tmp_path / "empty"), "--resume"), "no intact checkpoint under"),
             ((str(run),), "already holds a run (ckpt-0000005); add --resume"),  # a new run never overwrites one
             ((str(run), "--resume", "--set", "hidden_size=48", "seed=1"),
              "mismatching fields: hidden_size: checkpoint 32 vs now 48; seed: checkpoint 0 vs now 1"),
             ((str(run / "metrics.jsonl"),), "metrics.jsonl exists and is not a directory")]
    for (out, *rest), expected in cases:
        assert main(train_argv(tiny_corpus, "--out", out, *rest)) == 2
        err = capsys.readouterr().err
        assert err.startswith("dsv3: error: ") and expected in err and err.count("\n") == 1, err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_corpus, tmp_path, capsys):
    """With an absurd learning rate (1e30) the weights overflow; the run stops at the first step whose loss or
    gradient norm is not finite, with an error naming that step N, exit code 1, every logged loss finite, and
    checkpoint N-1 as the newest, its weights all finite (a step with a finite loss but a NaN gradient is not
    applied either: here the gradient goes first)."""
    run = tmp_path / "run"
    assert main(train_argv(tiny_corpus, "--out", str(run), "--max-steps", "8", "--ckpt-every", "1", "--set",
                           "lr=1e30", "warmup=0", "grad_clip=0")) == 1
    err = capsys.readouterr().err
    n = int(re.search(r"non-finite (?:loss|gradient norm) \(\w+\) at step (\d+)", err).group(1))
    assert 1 < n <= 8 and err.count("\n") == 1
    assert [s for s, _ in losses(run)] == list(range(1, n)) and all(math.isfinite(v) for _, v in losses(run))
    assert list_checkpoints(run)[-1].name == f"ckpt-{n - 1:07d}"
    weights = load_file(run / f"ckpt-{n - 1:07d}" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def _tiny_setup(tiny_corpus, **overrides):
    "The tiny model's configs (`TINY_SET` with `overrides`) and its prepared data."
    from dsv3_min.__main__ import _configs
    from dsv3_min.train import prepare_data
    cfg, tc = _configs("cpu-tiny", [*TINY_SET, *(f"{k}={v}" for k, v in overrides.items())], corpus=str(tiny_corpus))
    return cfg, tc, prepare_data(tc.corpus, cfg.vocab_size, log=lambda *a: None)


def _nan_at_step(n):
    "`lm_loss`, but NaN on its n-th call (one micro-batch per step: step n)."
    calls = []

    def loss_fn(model, x, y):
        calls.append(1)
        lp = lm_loss(model, x, y)
        return type(lp)(*(t * float("nan") for t in lp)) if len(calls) == n else lp
    return loss_fn


def test_non_finite_step_between_reads_stops_at_the_next_read_naming_it(tiny_corpus, tmp_path):
    """With `log_every=4` (reads after steps 4, 8, 12) a step 6 that goes NaN is skipped on the device, and so are
    steps 7 and 8; the read after step 8 raises `NonFiniteLoss` naming step 6, logs the finite step 5 as one record
    (step 5, `steps_logged` 1), keeps checkpoint 4, and leaves the model bit for bit as the run with `log_every=1`
    (which stops at once) leaves it: the state after step 5."""
    from dsv3_min.step import NonFiniteLoss
    states = {}
    for every in (1, 4):
        cfg, tc, data = _tiny_setup(tiny_corpus, max_steps=12, log_every=every, ckpt_every=4)
        torch.manual_seed(tc.seed)
        model = DeepSeekV3(cfg)
        opt = make_optimizer(model, tc, torch.device("cpu"))
        with pytest.raises(NonFiniteLoss, match=r"^non-finite loss \(nan\) at step 6; .*last good checkpoint: .*ckpt-0000004"):
            train_loop(model, opt, data, tc, tmp_path / f"e{every}", progress=False, loss_fn=_nan_at_step(6))
        recs = read_metrics(tmp_path / f"e{every}")
        states[every] = model.state_dict()
        assert [r["step"] for r in recs] == ([1, 2, 3, 4, 5] if every == 1 else [4, 5])
        assert [c.name for c in list_checkpoints(tmp_path / f"e{every}")] == ["ckpt-0000004"]
    assert recs[-1]["steps_logged"] == 1
    assert all(torch.equal(states[1][k], states[4][k]) for k in states[1])


def test_log_every_logs_window_means_of_the_very_same_steps(tiny_corpus, tmp_path):
    """Twenty steps logged every step and every 10 steps (evaluations every 4 steps force a read too): the runs take
    the same steps bit for bit. The second logs one record per read (steps 4, 8, 10, 12, 16, 20), each the exact mean
    (`math.fsum`) of the first run's per-step loss, parts and gradient norm over its `steps_logged` steps, with the lr
    of its step, the same validation numbers at evaluations and the same final weights. Every record has the same
    keys: step, steps_logged, loss, main, mtp, balance, lr, grad_norm, tokens_per_s, elapsed_s (and the evaluation's)."""
    runs = {}
    for every in (1, 10):
        cfg, tc, data = _tiny_setup(tiny_corpus, max_steps=20, log_every=every, ckpt_every=20)
        from dsv3_min.train import train
        train(cfg, tc, tmp_path / f"e{every}", data=data, progress=False, log=lambda *a: None)
        runs[every] = read_metrics(tmp_path / f"e{every}")
    one, ten = runs[1], runs[10]
    assert [r["step"] for r in one] == list(range(1, 21)) and [r["step"] for r in ten] == [4, 8, 10, 12, 16, 20]
    base = {"step", "steps_logged", "loss", "main", "mtp", "balance", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    evals = {"val_loss", "val_bits_per_byte", "max_vio", "expert_load"}
    for r in one + ten:
        assert set(r) - {"val_full_split"} == base | (evals if r["step"] % 4 == 0 else set()), r.keys()
    by_step, prev = {r["step"]: r for r in one}, 0
    for r in ten:
        window = [by_step[s] for s in range(prev + 1, r["step"] + 1)]
        assert r["steps_logged"] == len(window) and r["lr"] == by_step[r["step"]]["lr"]
        for k in ("loss", "main", "mtp", "balance", "grad_norm"):
            assert r[k] == math.fsum(w[k] for w in window) / len(window), (r["step"], k)
        for k in evals & set(r):
            assert r[k] == by_step[r["step"]][k]
        prev = r["step"]
    w = [(tmp_path / f"e{e}" / "ckpt-0000020" / "model.safetensors").read_bytes() for e in (1, 10)]
    assert w[0] == w[1]


def test_resume_in_the_middle_of_a_logging_window_logs_the_uninterrupted_records(tiny_corpus, tmp_path):
    """`log_every=4` with checkpoints every 3 steps: a run killed after its record of step 8 and resumed from
    checkpoint 6 (the middle of the window 5-8) logs the records of the uninterrupted run, bit for bit in every number
    but the clock: the reads after steps 3, 4, 6, 8, 9, 12 with the same windows and means."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ("--max-steps", "12", "--ckpt-every", "3", "--set", "log_every=4")
    assert main(train_argv(tiny_corpus, "--out", str(full), *args)) == 0
    child = Child(train_argv(tiny_corpus, "--out", str(cut), *args), on_step=freeze_at(8))
    wait_for_step(cut, 8, child.alive)
    assert child.kill() == -signal.SIGKILL
    assert main(train_argv(tiny_corpus, "--out", str(cut), *args, "--resume")) == 0
    clock = {"tokens_per_s", "elapsed_s"}
    a, b = ([{k: v for k, v in r.items() if k not in clock} for r in read_metrics(run)] for run in (full, cut))
    assert [r["step"] for r in a] == [3, 4, 6, 8, 9, 12] and [r["steps_logged"] for r in a] == [3, 1, 2, 2, 1, 3]
    assert a == b


def test_train_loop_continues_a_model_built_elsewhere(tiny_corpus, tmp_path):
    """`train_loop` takes a model and optimizer built by the caller (here: loaded from another run's checkpoint, as
    fine-tuning would); continuing with it from step 4 gives exactly the losses of the uninterrupted run."""
    from dsv3_min.__main__ import _configs
    from dsv3_min.train import prepare_data
    overrides = [*TINY_SET, "ckpt_every=4"]
    cfg, tc = _configs("cpu-tiny", overrides, corpus=str(tiny_corpus), max_steps=8)
    assert main(train_argv(tiny_corpus, "--out", str(tmp_path / "a"), "--max-steps", "8", "--set", "ckpt_every=4")) == 0
    data = prepare_data(tc.corpus, cfg.vocab_size, log=lambda *a: None)
    model = DeepSeekV3(cfg)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    state = load_checkpoint(tmp_path / "a" / "ckpt-0000004", model, opt, cfg)
    r = train_loop(model, opt, data, tc, tmp_path / "b", start=state["step"], progress=False)
    assert r.step == 8 and r.losses == [loss for step, loss in losses(tmp_path / "a") if step > 4]


def test_compile_compiles_the_loss_function(tiny_corpus, tmp_path, monkeypatch):
    """With `compile=true` (one process) `train` hands `torch.compile(lm_loss)` to the loop, once, and every micro-batch
    runs through what it returned: here `torch.compile` is replaced by a counting wrapper (nothing is compiled); one
    call, 3 steps through it, and the losses are those of the uncompiled run."""
    import dsv3_min.train as tr
    from dsv3_min.__main__ import _configs

    asked, calls = [], []

    def fake_compile(fn, **kw):
        asked.append(fn)
        return lambda *a: calls.append(1) or fn(*a)

    cfg, tc = _configs("cpu-tiny", list(TINY_SET), corpus=str(tiny_corpus), max_steps=3)
    data = tr.prepare_data(tc.corpus, cfg.vocab_size, log=lambda *a: None)
    plain = tr.train(cfg, tc, tmp_path / "plain", data=data, progress=False, log=lambda *a: None).losses
    assert not asked and not calls
    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = tr.train(cfg, dataclasses.replace(tc, compile=True), tmp_path / "compiled", data=data, progress=False,
                        log=lambda *a: None).losses
    assert asked == [lm_loss] and len(calls) == 3 and compiled == plain


def test_out_refuses_a_folder_that_is_not_a_run_and_one_inside_the_corpus(tiny_corpus, tmp_path, capsys):
    """`train --out` into a non-empty folder that holds no run is one line suggesting --resume, and the user's file is
    untouched; an --out inside the --corpus folder (its files would become training data) is refused before it exists."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("my own notes\n")
    assert main(train_argv(tiny_corpus, "--out", str(mine), "--max-steps", "1")) == 2
    assert "holds no run" in (err := capsys.readouterr().err) and "--resume" in err
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.jsonl"]
    assert (mine / "metrics.jsonl").read_text() == "my own notes\n"
    inside = tiny_corpus / "runs" / "a"
    assert main(train_argv(tiny_corpus, "--out", str(inside), "--max-steps", "1")) == 2
    assert "inside the corpus folder" in capsys.readouterr().err and not (tiny_corpus / "runs").exists()


def test_a_live_writers_lock_refuses_a_second_and_a_dead_ones_is_taken_over(tiny_corpus, tmp_path, capsys):
    """A run folder whose dsv3.lock names a live process refuses a second `train` (one line, nothing written); the lock
    of a process that died is taken over with a warning, and released when the run ends."""
    from dsv3_min.checkpoint import LOCK
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text(str(os.getppid()))  # a live process that is not this one
    assert main(train_argv(tiny_corpus, "--out", str(run), "--max-steps", "1")) == 2
    assert "being written by another process" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [LOCK]
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # now a dead process id
    (run / LOCK).write_text(str(pid))
    assert main(train_argv(tiny_corpus, "--out", str(run), "--max-steps", "1")) == 0
    assert "not running: taking the run over" in capsys.readouterr().err
    assert not (run / LOCK).exists() and len(losses(run)) == 1


def test_max_steps_flag_does_not_hide_a_bad_set_value(capsys):
    """`--max-steps N` wins over `--set max_steps=...` only once that value passed its check."""
    assert main(["train", "--max-steps", "3", "--set", "max_steps=0"]) == 2
    assert "max_steps=0" in capsys.readouterr().err


def test_long_phases_are_named_and_threads_zero_records_the_probed_count(tiny_corpus, tmp_path, capsys, monkeypatch):
    """With the progress bar on, the final validation and the checkpoint writing are named on it while they run (a bar
    at rest said nothing for minutes); the data preparation is announced before it starts; with `threads=0` (the
    default) the loop sets the count `probe_threads` chose and records it in every metrics line."""
    import dsv3_min.threads as th
    monkeypatch.setattr(th, "probe_threads", lambda *a, **k: 1)
    argv = ["train", "--corpus", str(tiny_corpus), "--out", str(tmp_path / "run"), "--set", *TINY_SET,
            "max_steps=2", "threads=0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert re.search(r"final validation: \d+ windows of 16 tokens", err) and "writing checkpoint 2" in err, err
    assert out.index("data: ") < out.index("train / ")
    assert [r.get("threads") for r in read_metrics(tmp_path / "run")] == [1, 1]


def test_lr_between_reads_follows_from_the_log_and_the_budget_still_stops_the_run(tiny_corpus, tmp_path):
    """With a 2-second time budget driving the schedule and `log_every=4`, the lr of each record's step is
    `lr_at(step, elapsed)` with elapsed = the previous record's `elapsed_s` plus the steps since at its pace
    (`tokens_per_step / tokens_per_s`; 0 before the first read): the schedule follows from metrics.jsonl alone. The
    budget, checked at reads only, still stops the run early, with a final evaluation."""
    from dsv3_min.optim import lr_at
    from dsv3_min.train import train
    cfg, tc, data = _tiny_setup(tiny_corpus, max_steps=100000, log_every=4, time_budget=2.0, warmup=0,
                                eval_every=1000)
    r = train(cfg, tc, tmp_path / "run", data=data, progress=False, log=lambda *a: None)
    recs = read_metrics(tmp_path / "run")
    assert r.stopped == "time_budget" and recs[-1]["elapsed_s"] >= 2.0 and "val_loss" in recs[-1] and len(recs) > 3
    elapsed, pace = 0.0, 0.0
    for rec in recs:
        assert rec["lr"] == lr_at(rec["step"] - 1, tc, elapsed + (rec["steps_logged"] - 1) * pace), rec["step"]
        elapsed, pace = rec["elapsed_s"], tc.batch_size * tc.seq_len / rec["tokens_per_s"]
    assert len({rec["lr"] for rec in recs}) > 2  # the clock moved the schedule
