"""Damage (issue 26): random damage to every file of a run folder, a LoRA adapter and a Hugging Face directory, loaded
through the public entry points (`from_pretrained`, `load_trained`, `load_adapter`, `python -m dsv3_min sample`); and
a real full disk (a small tmpfs) under `save_pretrained`, `save_checkpoint` and `save_adapter`.

The outcome of every case is one of: a one-line error (an error the command line prints as one `dsv3: error:` line,
exit 2), a warning with a fallback (an older intact checkpoint), or a correct result; never a traceback, a hang (each
case runs under a time limit) or a changed user file (every file is hashed before and after). A Hugging Face directory
and an adapter carry no checksums (their formats have none): a byte changed in place inside a tensor or a JSON string
can load "as stored"; those cases are counted, and they must load exactly what the files hold."""
import contextlib
import errno
import hashlib
import json
import math
import shutil
import signal
import subprocess
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError

from conftest import tiny_config
from dsv3_min.__main__ import exit_code, main
from dsv3_min.checkpoint import load_trained, save_checkpoint
from dsv3_min.hf import CheckpointWarning, from_pretrained, save_pretrained
from dsv3_min.lora import apply_lora, load_adapter, lora_layers, save_adapter
from dsv3_min.model import DeepSeekV3
from dsv3_min.tokenizer import train_tokenizer

CASE_SECONDS = 30          # a case that runs longer is a hang
OUTCOMES: Counter = Counter()   # (folder, outcome) -> cases, printed at the end of the module (pytest -s)
TEXT = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings."] * 30


class Hang(Exception):
    "A case ran past CASE_SECONDS."


@contextlib.contextmanager
def time_limit(seconds: int):
    "Raise `Hang` in the main thread after `seconds`."
    def alarm(*_):
        raise Hang(f"no outcome after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _hashes(*folders: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


class Originals:
    "The intact folders and what they load as (a short repr for hypothesis' reports)."
    def __repr__(self):
        return f"Originals({self.root})"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A run (two checkpoints with optimizer and tokenizer), a sharded Hugging Face directory with its tokenizer in the
    same folder, and a LoRA adapter on it, with the tensors each should load as."""
    root = tmp_path_factory.mktemp("originals")
    tok = train_tokenizer(TEXT, vocab_size=300)
    cfg = tiny_config(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    models = [DeepSeekV3(cfg).eval() for _ in range(2)]
    for step, m in zip((1, 2), models):
        opt = torch.optim.AdamW(m.parameters())
        m.loss(torch.randint(0, cfg.vocab_size, (1, 8)), torch.randint(0, cfg.vocab_size, (1, 8))).loss.backward()
        opt.step()
        opt.zero_grad()
        save_checkpoint(root / "run", step, m, opt, cfg, None, tok)
    save_pretrained(models[1], root / "hf", max_shard_bytes=150_000)
    tok.save(root / "hf")
    adapted = from_pretrained(root / "hf").eval()
    apply_lora(adapted, r=2, alpha=4, targets="attention")
    with torch.no_grad():
        for m in lora_layers(adapted).values():
            m.lora_B.weight.normal_(std=0.05)
    save_adapter(adapted, root / "adapter", base_model_name_or_path=str(root / "hf"))
    o = Originals()
    o.root, o.fingerprint = root, tok.fingerprint
    o.weights = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    o.lora = {k: v.clone() for k, v in adapted.state_dict().items() if "lora_" in k}
    yield o
    print("\ndamage outcomes:", dict(sorted(OUTCOMES.items())))


def _damage(f: Path, kind: str, where: float, value, dtype: str) -> None:
    """Damage file `f`: cut it, flip three bytes, forge the safetensors header length, change one tensor's dtype in the
    header, or replace a JSON value (one, two or three levels deep) by `value`."""
    b = f.read_bytes()
    at = int(where * len(b))
    if kind == "truncate":
        f.write_bytes(b[:at])
    elif kind == "flip":
        f.write_bytes(b[:at] + bytes(x ^ 0xFF for x in b[at:at + 3]) + b[at + 3:])
    elif kind == "header":
        f.write_bytes(int(10**12 * where + 9).to_bytes(8, "little") + b[8:])
    elif kind == "dtype":
        n = int.from_bytes(b[:8], "little")
        header = json.loads(b[8:8 + n])
        names = sorted(k for k in header if k != "__metadata__")
        if names:
            header[names[int(where * len(names))]]["dtype"] = dtype
        text = json.dumps(header).encode()
        f.write_bytes(len(text).to_bytes(8, "little") + text + b[8 + n:])
    else:   # json
        d = obj = json.loads(b)
        for depth in range(3):
            if not isinstance(obj, dict) or not obj:
                break
            key = sorted(obj)[int(where * len(obj) * (depth + 1)) % len(obj)]
            if depth == 2 or not isinstance(obj[key], dict) or int(where * 10 + depth) % 2:
                obj[key] = value
                break
            obj = obj[key]
        f.write_text(json.dumps(d if isinstance(d, dict) and d else value))


def _kinds(f: Path) -> list[str]:
    return {".safetensors": ["truncate", "flip", "header", "dtype"], ".json": ["truncate", "flip", "json"]}.get(
        f.suffix, ["truncate", "flip"])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _case(run_it, capsys) -> tuple[str, object]:
    """Run one entry point: ("ok", result), ("fallback", result), ("error", message); anything else fails the test."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught, time_limit(CASE_SECONDS):
        warnings.simplefilter("always")
        try:
            result = run_it()
        except Exception as e:
            if exit_code(e) != 2:   # not one of the package's one-line errors: a traceback on the command line
                raise
            return "error", str(e)
    if isinstance(result, int):   # `main`: exit 0 or one `dsv3: error:` line with exit 2, never a traceback
        err = capsys.readouterr().err
        assert result in (0, 2) and "Traceback" not in err, err
        if result == 2:
            assert err.strip().splitlines()[-1].startswith("dsv3: error: "), err
            return "error", err
    fell_back = any(issubclass(w.category, CheckpointWarning) for w in caught)
    return ("fallback" if fell_back else "ok"), result


FOLDERS = ["run", "hf", "adapter"]
ENTRIES = {"run": ["from_pretrained", "load_trained", "sample"], "hf": ["from_pretrained", "load_trained", "sample"],
           "adapter": ["load_adapter", "sample", "sample-found"]}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folder=st.sampled_from(FOLDERS), pick=st.floats(0, 1, exclude_max=True), entry=st.floats(0, 1, exclude_max=True),
       kind=st.floats(0, 1, exclude_max=True), where=st.floats(0, 1, exclude_max=True),
       value=st.sampled_from([[1, 2], "x", None, 3.5, {"a": 1}, -1, True, 10**12, ""]),
       dtype=st.sampled_from(["I32", "U32", "F16", "BF16", "I64", "F64", "BOOL", "U8", "F8_E4M3"]))
def test_damaged_files_load_or_fail_in_one_line(originals, tmp_path_factory, capsys, folder, pick, entry, kind, where,
                                                value, dtype):
    """Random damage to one file of a run, a Hugging Face directory or an adapter, loaded by a random entry point:
    a one-line error, a fallback with a warning (runs), or the right tensors; never a traceback, a hang or a
    changed file. Without checksums (Hugging Face, adapters) a flip inside a tensor loads as stored."""
    root, weights, lora, fingerprint = originals.root, originals.weights, originals.lora, originals.fingerprint
    work = tmp_path_factory.mktemp("case") / folder
    shutil.copytree(root / folder, work)
    files = sorted(p for p in work.rglob("*") if p.is_file())
    target = files[int(pick * len(files))]
    kinds = _kinds(target)
    how = kinds[int(kind * len(kinds))]
    _damage(target, how, where, value, dtype)
    before = _hashes(work, root)
    name = ENTRIES[folder][int(entry * len(ENTRIES[folder]))]
    sample = ["sample", "--prompt", "To be", "--max-new-tokens", "3", "--seed", "0"]
    if folder == "adapter":
        def run_it():
            if name == "sample":
                return main([*sample, "--ckpt", str(root / "hf"), "--adapter", str(work)])
            if name == "sample-found":   # the adapter folder alone: its base is the one it records
                return main([*sample, "--ckpt", str(work)])
            return load_adapter(from_pretrained(root / "hf").eval(), work)
    else:
        run_it = {"from_pretrained": lambda: from_pretrained(work), "load_trained": lambda: load_trained(work),
                  "sample": lambda: main([*sample, "--ckpt", str(work)])}[name]
    outcome, result = _case(run_it, capsys)
    assert _hashes(work, root) == before, "a user file changed"
    if outcome != "error" and not name.startswith("sample"):
        model, tok = result if name == "load_trained" else (result, None)
        got = model.state_dict()
        if folder == "adapter":
            stored = {k: v for k, v in got.items() if "lora_" in k}
            outcome = "ok" if _same(stored, lora) else "as stored (no checksum)"
            assert outcome == "ok" or how == "flip", (target.name, how)
        elif folder == "run":   # a manifest: the newest checkpoint, or the older one after a warning
            assert _same(got, weights[1]) if outcome == "ok" else _same(got, weights[0]), (target.name, how, outcome)
            assert tok is None or tok.fingerprint == fingerprint
        else:
            intact = _same(got, weights[1]) and (tok is None or tok.fingerprint == fingerprint)
            outcome = "ok" if intact else "as stored (no checksum)"
            assert intact or how in ("flip", "json"), (target.name, how)
    OUTCOMES[folder, outcome] += 1


# ---- a real full disk ------------------------------------------------------------------------------------------

@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs at `tmp_path/disk` (root only; skipped, saying why, where mount is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mount -t tmpfs refused here ({r.stderr.strip() or r.returncode}): the full-disk test needs root; "
                    "test_safetensors_disk_error_is_an_oserror covers the error safetensors raises")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> None:
    "Fill the file system of `disk` until about `leave` bytes are free."
    import os
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    if free > leave:
        (disk / "filler").write_bytes(b"\0" * (free - leave))


def _small_model(seed: int) -> DeepSeekV3:
    torch.manual_seed(seed)
    return DeepSeekV3(tiny_config(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                  v_head_dim=8, n_routed_experts=4, n_group=1, topk_group=1))


@pytest.mark.parametrize("writer", ["save_pretrained", "save_checkpoint", "save_adapter"])
def test_full_disk_keeps_the_old_files_and_raises_one_oserror(full_disk, writer):
    """On a real full file system (tmpfs), a second `save_pretrained` over a model directory, a second checkpoint of
    a run and a second `save_adapter` raise one OSError (ENOSPC, exit 1 on the command line, one line), leave the
    first save's files byte-identical and no temporary behind."""
    old, new = _small_model(0), _small_model(1)
    target = full_disk / "x"
    if writer == "save_pretrained":
        save = lambda m: save_pretrained(m, target)   # noqa: E731
    elif writer == "save_checkpoint":
        save = lambda m: save_checkpoint(target, 1 if m is old else 2, m, None, m.config)   # noqa: E731
    else:
        for m in (old, new):
            apply_lora(m, r=64, alpha=8, targets="all")
        save = lambda m: save_adapter(m, target)   # noqa: E731
    save(old)
    first = _hashes(target)
    _fill(full_disk, 20_000)
    with pytest.raises(OSError) as e:
        save(new)
    assert e.value.errno == errno.ENOSPC and exit_code(e.value) == 1 and "\n" not in str(e.value)
    assert _hashes(target) == first
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "x"]


def test_safetensors_disk_error_is_an_oserror(tmp_path, monkeypatch):
    """Where no file system can be filled, the error safetensors raises for a full disk (its own SafetensorError,
    not an OSError) still becomes one OSError with errno ENOSPC, and the previous model directory stays intact."""
    import dsv3_min.hf as hf
    save_pretrained(_small_model(0), tmp_path / "m")
    first = _hashes(tmp_path / "m")

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(hf, "save_file", full)
    with pytest.raises(OSError) as e:
        save_pretrained(_small_model(1), tmp_path / "m")
    assert e.value.errno == errno.ENOSPC and exit_code(e.value) == 1 and "\n" not in str(e.value)
    assert _hashes(tmp_path / "m") == first and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_errors_never_echo_file_contents(tmp_path):
    """A file that is not safetensors (the first lines of a password file) is refused without its bytes in the error:
    neither as text nor as the integer its first 8 bytes make as a header length."""
    from dsv3_min.files import FileFormatError, check_safetensors
    secret = b"root:x:0:0:secret-hash:/root:/bin/bash\n" * 4
    (tmp_path / "model.safetensors").write_bytes(secret)
    with pytest.raises(FileFormatError) as e:
        check_safetensors(tmp_path / "model.safetensors")
    assert str(int.from_bytes(secret[:8], "little")) not in str(e.value) and "secret" not in str(e.value)


# ---- a teacher cache ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    """A tiny teacher (NOT a real model size), its offline top-8 cache of 4 micro-batches, the tokens it was written
    from, and what an intact cache's 2-step distillation logs."""
    import numpy as np

    from dsv3_min.distill import write_teacher_cache
    from dsv3_min.train import TrainData
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    teacher = DeepSeekV3(tiny_config(vocab_size=64)).eval()
    tokens = np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)
    data = TrainData(None, tokens[:2500], tokens[2500:], 0.5)
    write_teacher_cache(teacher, data.train, root / "cache", 4, 2, 16, 1, 8, 2.0, "float16", progress=False)
    yield teacher, data, root / "cache"
    print("\nteacher-cache outcomes:", dict(sorted(CACHE_OUTCOMES.items())))


CACHE_OUTCOMES: Counter = Counter()


def _damage_cache_header(f: Path, how: str, where: float, value, dtype: str) -> None:
    "Forge a field of header.json: a size (n_batches, batch_size, seq_len, k), a dtype, or any field's value."
    h = json.loads(f.read_bytes())
    keys = sorted(h)
    if how == "sizes":
        h[["n_batches", "batch_size", "seq_len", "k"][int(where * 4)]] = int(10 ** (12 * where)) - 1
    elif how == "dtypes":
        h[["ids_dtype", "logp_dtype"][int(where * 2)]] = dtype
    else:
        h[keys[int(where * len(keys))]] = value
    f.write_text(json.dumps(h))


@settings(max_examples=22, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from([("header.json", k) for k in ("truncate", "flip", "sizes", "dtypes", "json")]
                            + [(f, k) for f in ("ids.bin", "inputs.bin", "logp.bin") for k in ("truncate", "flip")]),
       where=st.floats(0, 1, exclude_max=True),
       value=st.sampled_from([[1, 2], "x", None, 3.5, {"a": 1}, -1, True, 10**12, "", 0]),
       dtype=st.sampled_from(["float64", "int8", "object", "<U4", "uint16", "int32", "float16", "float32", "bool"]))
def test_damaged_teacher_cache_fails_in_one_line_or_trains(teacher_cache, tmp_path_factory, capsys, case, where, value,
                                                            dtype):
    """Random damage to one file of a teacher cache (cut, three bytes flipped, a size or dtype of the header forged,
    a header value of another type), then a 2-step offline distillation from it: a one-line error (what the command
    line prints with exit 2) or a run with finite losses (a flip inside the stored log-probs trains on them as stored);
    never a traceback, a hang, or a change to the cache's files."""
    from dsv3_min.distill import DistillConfig, distill, student_config
    from dsv3_min.train import TrainConfig
    teacher, data, cache = teacher_cache
    work = tmp_path_factory.mktemp("cache") / "cache"
    shutil.copytree(cache, work)
    target, how = work / case[0], case[1]
    if how in ("truncate", "flip"):
        _damage(target, how, where, value, dtype)
    else:
        _damage_cache_header(target, how, where, value, dtype)
    before = _hashes(work)
    tc = TrainConfig(max_steps=2, batch_size=2, seq_len=16, warmup=1, eval_every=2, eval_batches=1,
                     final_eval_batches=1, threads=1, device="cpu", seed=1)
    run = tmp_path_factory.mktemp("run") / "run"
    outcome = "trained"
    with time_limit(CASE_SECONDS):
        try:
            r = distill(teacher, student_config(teacher.config), tc, DistillConfig(kd_topk=8, kd_temperature=2.0),
                        run, data=data, cache=work, progress=False, log=lambda *a: None)
            assert r.step == 2 and all(math.isfinite(x) for x in r.losses), (target.name, how, r.losses)
        except Exception as e:
            if exit_code(e) != 2:
                raise
            assert "\n" not in str(e)
            outcome = "error"
    assert _hashes(work) == before, "the cache changed"
    CACHE_OUTCOMES[target.name, how, outcome] += 1
