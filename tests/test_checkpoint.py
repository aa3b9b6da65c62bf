"""Tests of dsv3_min.checkpoint: exact optimizer/RNG round trips, the checkpoint files and manifest, pruning, the
config-mismatch error, and the fall back to the newest intact checkpoint when a newer one is damaged."""
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load, save, save_file

from conftest import assert_optimizer_state_refused, tiny_config
from dsv3_min import checkpoint
from dsv3_min.checkpoint import (
    flatten_optimizer_state,
    load_checkpoint,
    load_trained,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optimizer_state,
)
from dsv3_min.files import FileFormatError
from dsv3_min.hf import CheckpointError, CheckpointWarning, checkpoint_problem, latest_checkpoint
from dsv3_min.model import DeepSeekV3
from dsv3_min.optim import make_optimizer
from dsv3_min.train import TrainConfig


def test_optimizer_state_roundtrip_is_exact():
    """Flattened AdamW state (safetensors tensors + JSON) restores an optimizer whose next step is bit-identical."""
    cfg, tc = tiny_config(), TrainConfig(lr=1e-2)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    models = [DeepSeekV3(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(m, tc, torch.device("cpu")) for m in models]
    for _ in range(2):
        models[0].loss(x[:, :-1], x[:, 1:]).loss.backward()
        opts[0].step()
        opts[0].zero_grad()
    tensors, meta = flatten_optimizer_state(opts[0])
    tensors, meta = load(save(tensors)), json.loads(json.dumps(meta))  # through the real formats
    models[1].load_state_dict(models[0].state_dict())
    opts[1].load_state_dict(unflatten_optimizer_state(tensors, meta))
    for m, o in zip(models, opts):
        m.loss(x[:, :-1], x[:, 1:]).loss.backward()
        o.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), n


def test_rng_state_roundtrip_through_json():
    """torch, python and numpy RNG states survive JSON and reproduce the same draws."""
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    s = json.loads(json.dumps(rng_state()))
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(s)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


@pytest.fixture
def saved(tmp_path):
    """Three checkpoints (steps 1, 2, 3; keep_last=2) of a tiny model with its optimizer."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg)
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, cfg, TrainConfig(), keep_last=2)
    return tmp_path, model, cfg


def test_checkpoint_files_keep_last_and_config_mismatch(saved):
    """Checkpoints are safetensors + JSON only, renamed into place (no temp left), pruned to keep_last, with a manifest
    of every file's size and SHA-256; they reload exactly, and refuse a different model config, naming the fields."""
    run, model, cfg = saved
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000002", "ckpt-0000003"]
    files = sorted(p.name for p in (run / "ckpt-0000003").iterdir())
    assert files == ["config.json", "manifest.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    manifest = json.loads((run / "ckpt-0000003" / "manifest.json").read_text())["files"]
    assert sorted(manifest) == [f for f in files if f != "manifest.json"]
    assert manifest["model.safetensors"]["bytes"] == (run / "ckpt-0000003" / "model.safetensors").stat().st_size
    other = DeepSeekV3(cfg)
    load_checkpoint(run / "ckpt-0000003", other, cfg=cfg)
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="mismatching fields: hidden_size: checkpoint 64 vs now 32"):
        load_checkpoint(run / "ckpt-0000003", DeepSeekV3(tiny_config(hidden_size=32)), cfg=tiny_config(hidden_size=32))


@pytest.mark.parametrize("damage", ["truncate", "flip", "bad-json", "missing", "header"])
def test_latest_checkpoint_skips_a_damaged_one_with_one_warning(saved, damage):
    """A truncated weights file, one flipped byte, an invalid state.json, a deleted file or a garbled safetensors
    header in the newest checkpoint make `latest_checkpoint` (and `load_trained`) fall back to the previous one with
    exactly one one-line warning naming the broken checkpoint."""
    run, _, _ = saved
    new = run / "ckpt-0000003"
    w = new / "model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
    elif damage == "flip":
        b = bytearray(w.read_bytes())
        b[-5] ^= 0xFF
        w.write_bytes(bytes(b))
    elif damage == "bad-json":
        (new / "state.json").write_text('{"step": 3,')
    elif damage == "missing":
        (new / "optimizer.safetensors").unlink()
    else:
        b = bytearray(w.read_bytes())
        b[10:14] = b"}}}}"
        w.write_bytes(bytes(b))
    assert checkpoint_problem(run / "ckpt-0000002") is None and checkpoint_problem(new)
    with pytest.warns(CheckpointWarning) as rec:
        assert latest_checkpoint(run) == run / "ckpt-0000002"
    assert len(rec) == 1 and str(new) in str(rec[0].message) and "\n" not in str(rec[0].message)



def _run_with_two_checkpoints(tmp_path):
    "A run folder with checkpoints 4 and 5 of a TINY model and its own tokenizer: (tok, cfg, model, run)."
    from dsv3_min.tokenizer import train_tokenizer
    tok = train_tokenizer(["To be, or not to be, that is the question. Whether 'tis nobler in the mind."] * 30,
                          vocab_size=300)
    cfg = tiny_config(vocab_size=tok.vocab_size)
    model, run = DeepSeekV3(cfg), tmp_path / "run"
    for step in (4, 5):
        save_checkpoint(run, step, model, None, cfg, None, tok)
    return tok, cfg, model, run

def test_load_trained_falls_back_and_errors_name_the_file(tmp_path):
    """`load_trained` of a run whose newest checkpoint is truncated loads the previous one (with a warning); a
    checkpoint directory given directly that is broken, or a run where every checkpoint is broken, is a
    `CheckpointError` naming it."""
    tok, cfg, model, run = _run_with_two_checkpoints(tmp_path)
    w = run / "ckpt-0000005" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-8])
    with pytest.warns(CheckpointWarning, match="ckpt-0000005"):
        loaded, _ = load_trained(run)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match="ckpt-0000005 is broken: model.safetensors has"):
        load_trained(run / "ckpt-0000005")
    (run / "ckpt-0000004" / "state.json").write_text("{")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="none of its 2 checkpoints is intact"):
        load_trained(run)


def test_wrong_shape_in_our_checkpoint_is_a_checkpoint_error(saved):
    """A tensor of the wrong shape in our own model.safetensors gives hf's CheckpointError (naming the file and the
    tensor with both shapes, nothing loaded), not load_state_dict's traceback."""
    run, model, cfg = saved
    ck = run / "ckpt-0000003"
    sd = load((ck / "model.safetensors").read_bytes())
    sd["norm.weight"] = torch.ones(7)
    save_file(sd, str(ck / "model.safetensors"))
    fresh = DeepSeekV3(cfg)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"(?s)model.safetensors: checkpoint does not match .*norm.weight: "
                                              r"checkpoint \(7,\), model \(64,\)"):
        load_checkpoint(ck, fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing was loaded


def test_bad_state_json_names_the_file(saved):
    """Invalid JSON in state.json is a FileFormatError naming the file; a string where the model config has a
    float (as a hand-edited file might hold) is an error naming the file and the field."""
    run, model, cfg = saved
    ck = run / "ckpt-0000003"
    (ck / "state.json").write_text('{"step": 3, ')
    with pytest.raises(FileFormatError, match="ckpt-0000003/state.json"):
        load_checkpoint(ck, DeepSeekV3(cfg))
    state = json.loads((run / "ckpt-0000002" / "state.json").read_text())
    state["model_config"]["num_hidden_layers"] = "3"
    (run / "ckpt-0000002" / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="ckpt-0000002/state.json: bad model_config: .*num_hidden_layers"):
        load_checkpoint(run / "ckpt-0000002", DeepSeekV3(cfg))


def test_stale_temp_dirs_are_removed_on_the_next_save(saved, monkeypatch):
    """A temp folder left by a writer that died (a dead pid in its name) and a half-deleted old checkpoint are
    removed by the next save; a failing save leaves the previous checkpoints as they were and no temp behind."""
    run, model, cfg = saved
    dead = 2**22 + 4321  # above Linux's default pid_max: no such process
    (run / f".ckpt-0000004.tmp-{dead}-0123abcd").mkdir()
    (run / f".ckpt-0000001.tmp-{dead}-89abcdef").mkdir()
    save_checkpoint(run, 4, model, None, cfg, keep_last=2)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000003", "ckpt-0000004"]

    def full_disk(folder):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "write_manifest", full_disk)  # fails inside the write, after the weights
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(run, 5, model, None, cfg, keep_last=2)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000003", "ckpt-0000004"]
    assert latest_checkpoint(run) == run / "ckpt-0000004"


@pytest.mark.parametrize("damage", ["truncate", "flip", "json-type", "garbage"])
def test_damaged_tokenizer_without_manifest_falls_back(tmp_path, damage):
    """A checkpoint with no manifest (an older writer, or a copy without it) whose tokenizer is damaged is a broken
    checkpoint like any other: `load_trained` of the run falls back to the previous intact one with one warning, and
    the checkpoint named directly is one `CheckpointError` line, never a traceback from the tokenizer library."""
    tok, cfg, model, run = _run_with_two_checkpoints(tmp_path)
    new = run / "ckpt-0000005"
    (new / "manifest.json").unlink()
    f = new / "tokenizer" / ("tokenizer.json" if damage == "json-type" else "tokenizer.model")
    b = f.read_bytes()
    f.write_bytes({"truncate": b[: len(b) // 3], "flip": b[:40] + bytes(x ^ 0xFF for x in b[40:60]) + b[60:],
                   "json-type": json.dumps({"model": [1, 2], "version": 3}).encode(), "garbage": b"\x00" * 64}[damage])
    if damage == "json-type":
        (new / "tokenizer" / "tokenizer.model").unlink()
    with pytest.warns(CheckpointWarning, match="skipping broken checkpoint .*ckpt-0000005: tokenizer") as rec:
        _, loaded_tok = load_trained(run)
    assert len(rec) == 1 and loaded_tok.fingerprint == tok.fingerprint
    with pytest.raises(CheckpointError, match="ckpt-0000005 is broken: tokenizer") as e:
        load_trained(new)
    assert "\n" not in str(e.value)


def _stepped(tmp_path):
    """A tiny model, its AdamW after one step (so every parameter has moments), saved as `tmp_path/ckpt-0000001`."""
    cfg, tc = tiny_config(), TrainConfig(lr=1e-2)
    model = DeepSeekV3(cfg)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    model.loss(x[:, :-1], x[:, 1:]).loss.backward()
    opt.step()
    return cfg, tc, model, opt, save_checkpoint(tmp_path, 1, model, opt, cfg, tc)


@pytest.mark.parametrize("change", ["id", "name", "all-names", "dtype", "groups"])
def test_renamed_or_retyped_optimizer_state_is_refused(tmp_path, change):
    """Optimizer state that `torch.optim` would accept but not use (a parameter id no group holds, a moment renamed
    for one parameter or for all, an integer moment converted by value, groups of another size) is refused in one
    line before anything is loaded, instead of restarting the Adam moments from zero; the intact state loads."""
    from safetensors.torch import load_file

    cfg, tc, model, opt, ckpt = _stepped(tmp_path)
    fresh = DeepSeekV3(cfg)
    load_checkpoint(ckpt, fresh, make_optimizer(fresh, tc, torch.device("cpu")), cfg)   # intact: loads
    sd = load_file(str(ckpt / "optimizer.safetensors"))
    if change == "id":
        sd = {k.replace("state.0.", "state.999."): v for k, v in sd.items()}
    elif change == "name":
        sd["state.0.exp_avg_renamed"] = sd.pop("state.0.exp_avg")
    elif change == "all-names":
        sd = {k.replace(".exp_avg_sq", ".second"): v for k, v in sd.items()}
    elif change == "dtype":
        sd["state.0.exp_avg"] = sd["state.0.exp_avg"].to(torch.int32)
    else:
        state = json.loads((ckpt / "state.json").read_text())
        state["optimizer"]["param_groups"][0]["params"].pop()
        (ckpt / "state.json").write_text(json.dumps(state))
    assert_optimizer_state_refused(ckpt, sd, cfg, tc)


@pytest.mark.parametrize("entry", ["../outside.bin", "/etc/passwd"])
def test_manifest_entries_outside_the_checkpoint_are_refused(saved, entry):
    """A manifest that names a file outside its checkpoint (`../x`, an absolute path) makes the checkpoint broken
    (a fallback to the previous one with a warning) without reading or hashing that file."""
    run, _, _ = saved
    (run / "outside.bin").write_bytes(b"x")
    m = run / "ckpt-0000003" / "manifest.json"
    d = json.loads(m.read_text())
    d["files"][entry] = {"bytes": 1, "sha256": "0" * 64}
    m.write_text(json.dumps(d))
    assert checkpoint_problem(run / "ckpt-0000003") == f"manifest.json names a file outside the checkpoint ({entry!r})"
    with pytest.warns(CheckpointWarning, match="outside the checkpoint"):
        assert latest_checkpoint(run) == run / "ckpt-0000002"


def test_a_fresh_run_lock_refuses_a_folder_another_run_wrote_since_its_check(tmp_path):
    """`run_lock(fresh=True)`, taken by a new run after its checks, refuses a folder that another run wrote into in
    between (it finished and released its lock before this one asked): no lock or temp file is left behind; the same
    folder is fine for a resume (`fresh=False`)."""
    from dsv3_min.checkpoint import LOCK, run_lock
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="already holds another run's files"):
        with run_lock(run, fresh=True):
            pass
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    with run_lock(run) as lock:
        assert lock.name == LOCK and lock.read_text() == str(os.getpid())
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
