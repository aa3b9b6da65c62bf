"""dsv3_min.files: atomic writes survive simulated crashes, broken files give one-line errors naming them,
partial JSON Lines tails are dropped, truncated safetensors are detected, stale temporaries are cleaned."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from dsv3_min import files
from dsv3_min.files import (
    FileFormatError,
    append_jsonl,
    atomic_dir,
    atomic_write,
    check_safetensors,
    read_json,
    read_jsonl,
    remove_stale_temps,
    write_json,
    write_jsonl,
)

DEAD_PID = 2**22 + 12345  # above Linux's largest pid_max: never a running process


def _crash(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_atomic_write_crash_before_rename_keeps_old_file(tmp_path, monkeypatch):
    """A crash between writing the temporary file and the rename (os.replace raising) leaves the old file intact
    and no temporary behind; a later write succeeds."""
    p = tmp_path / "config.json"
    p.write_text("old")
    monkeypatch.setattr(files.os, "replace", _crash)
    with pytest.raises(OSError, match="No space"):
        atomic_write(p, "new")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["config.json"]
    monkeypatch.undo()
    atomic_write(p, b"new")
    assert p.read_bytes() == b"new"


def test_atomic_write_failing_write_keeps_old_file(tmp_path, monkeypatch):
    """A full disk while flushing the temporary file (os.fsync raising OSError) keeps the old file and leaves no temporary."""
    p = tmp_path / "state.json"
    write_json(p, {"step": 1})
    monkeypatch.setattr(files.os, "fsync", _crash)
    with pytest.raises(OSError):
        write_json(p, {"step": 2})
    monkeypatch.undo()
    assert read_json(p) == {"step": 1} and len(list(tmp_path.iterdir())) == 1


def test_write_json_format_and_roundtrip(tmp_path):
    """write_json writes sorted keys, indent 2 and a trailing newline; read_json reads it back."""
    p = write_json(tmp_path / "a" / "x.json", {"b": 1, "a": [1.5, "é"]})
    assert p.read_text(encoding="utf-8") == '{\n  "a": [\n    1.5,\n    "é"\n  ],\n  "b": 1\n}\n'
    assert read_json(p) == {"a": [1.5, "é"], "b": 1}


@pytest.mark.parametrize("content", [b'{"step": 1,', b"", b"\xff\xfe", b"{'a': 1}"])
def test_read_json_error_names_file_in_one_line(tmp_path, content):
    """Invalid JSON or bytes give a FileFormatError (a ValueError) of one line that names the file."""
    p = tmp_path / "state.json"
    p.write_bytes(content)
    with pytest.raises(FileFormatError) as e:
        read_json(p)
    assert isinstance(e.value, ValueError)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content,schema,message", [
    ("[1, 2]", None, "must hold a JSON object, got a list"),
    ('"x"', None, "must hold a JSON object, got a string 'x'"),
    ('{"step": 1}', {"step": int, "seed": int}, "missing key 'seed'"),
    ('{"step": "1"}', {"step": int}, "'step' must be an integer, got a string '1'"),
])
def test_read_json_checks_the_object_and_its_schema(tmp_path, content, schema, message):
    """read_json returns only a JSON object, with the schema's keys typed: other shapes are a one-line
    FileFormatError naming the file (not a KeyError or AttributeError further on)."""
    p = tmp_path / "state.json"
    p.write_text(content)
    with pytest.raises(FileFormatError) as e:
        read_json(p, schema)
    assert str(e.value) == f"{p}: {message}"


def test_write_json_refuses_nan_and_leaves_no_file(tmp_path):
    """JSON has no NaN or infinity: write_json raises a one-line ValueError naming the file and writes nothing."""
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="x.json: Out of range float"):
            write_json(tmp_path / "x.json", {"a": [1.0, bad]})
    assert list(tmp_path.iterdir()) == []


def test_jsonl_append_and_read(tmp_path):
    """Appended records read back in order; write_jsonl rewrites a log atomically."""
    p = tmp_path / "metrics.jsonl"
    for i in range(3):
        append_jsonl(p, {"step": i})
    assert read_jsonl(p) == [{"step": 0}, {"step": 1}, {"step": 2}]
    write_jsonl(p, [{"step": 0}])
    assert read_jsonl(p) == [{"step": 0}]
    assert read_jsonl(write_jsonl(tmp_path / "empty.jsonl", [])) == []


@pytest.mark.parametrize("tail", [b'{"step": 3, "lo', b'{"step": 3}', b"\xff", b"garbage\n"])
def test_read_jsonl_drops_partial_last_line_with_warning(tmp_path, tail):
    """A partial or invalid last line (a crash mid-append) is dropped with one warning that names the file."""
    p = tmp_path / "metrics.jsonl"
    for i in range(3):
        append_jsonl(p, {"step": i})
    with open(p, "ab") as f:
        f.write(tail)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert read_jsonl(p) == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert len(w) == 1 and str(p) in str(w[0].message) and "\n" not in str(w[0].message)


def test_read_jsonl_bad_middle_line_raises(tmp_path):
    """A bad line that is not the last one is corruption, not a crash trace: FileFormatError naming file and line."""
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"step": 0}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(FileFormatError, match=r"metrics\.jsonl: line 2 "):
        read_jsonl(p)


def test_append_after_crash_cuts_partial_line(tmp_path):
    """Appending after a crash left a partial line cuts that line first, so it does not become a corrupt middle line."""
    p = tmp_path / "metrics.jsonl"
    append_jsonl(p, {"step": 0})
    with open(p, "ab") as f:
        f.write(b'{"step": 1, "lo')
    with pytest.warns(UserWarning, match="partial last line"):
        append_jsonl(p, {"step": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no further warning: the file is clean
        assert read_jsonl(p) == [{"step": 0}, {"step": 1}]


def test_atomic_dir_success_replaces_whole_folder(tmp_path):
    """A successful atomic_dir replaces an existing folder whole: files of the old version do not survive."""
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "model-00001-of-00002.safetensors").write_bytes(b"x")
        write_json(d / "state.json", {"step": 1})
    with atomic_dir(final) as d:
        write_json(d / "state.json", {"step": 2})
    assert sorted(p.name for p in final.iterdir()) == ["state.json"] and read_json(final / "state.json")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_dir_exception_keeps_old_folder(tmp_path):
    """An exception inside atomic_dir (a failing save) removes the temporary folder and leaves the old one as it was."""
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        write_json(d / "state.json", {"step": 1})
    with pytest.raises(OSError):
        with atomic_dir(final) as d:
            write_json(d / "state.json", {"step": 2})
            _crash()
    assert read_json(final / "state.json") == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_dir_without_exchange_uses_rename_aside(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is unavailable the rename-aside fallback gives the same result, and a failing
    second rename puts the old folder back."""
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    final = tmp_path / "tok"
    for step in (1, 2):
        with atomic_dir(final) as d:
            write_json(d / "state.json", {"step": step})
    assert read_json(final / "state.json") == {"step": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    real_rename = os.rename

    def rename(a, b):
        if ".tmp-" in str(a):
            _crash()
        real_rename(a, b)
    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError):
        with atomic_dir(final) as d:
            write_json(d / "state.json", {"step": 3})
    assert read_json(final / "state.json") == {"step": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_atomic_dir_uses_exchange_on_linux(tmp_path, monkeypatch):
    """On Linux the swap of an existing folder is one renameat2(RENAME_EXCHANGE) call: the rename-aside path is unused."""
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    (tmp_path / "p" / "in_p").write_text("")
    if not files._exchange(tmp_path / "p", tmp_path / "q"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert [x.name for x in (tmp_path / "q").iterdir()] == ["in_p"] and not list((tmp_path / "p").iterdir())
    final = tmp_path / "tok"
    with atomic_dir(final) as d:
        write_json(d / "a.json", {"v": 1})
    monkeypatch.setattr(files, "_temp_sibling", lambda p, kind="tmp": pytest.fail("aside") if kind == "old"
                        else p.with_name(f".{p.name}.tmp-{os.getpid()}-0000beef"))
    with atomic_dir(final) as d:
        write_json(d / "a.json", {"v": 2})
    assert read_json(final / "a.json") == {"v": 2}


def test_atomic_dir_refuses_a_file(tmp_path):
    """atomic_dir onto an existing regular file stops with a one-line error naming it and keeps the file."""
    (tmp_path / "out").write_text("keep")
    with pytest.raises(NotADirectoryError, match="out exists and is not a folder"):
        with atomic_dir(tmp_path / "out") as d:
            (d / "x").write_text("1")
    assert (tmp_path / "out").read_text() == "keep" and len(list(tmp_path.iterdir())) == 1


def test_remove_stale_temps(tmp_path):
    """Leftovers of dead writers are removed, an aside folder whose target is missing is put back, and temporaries of
    live processes, in-flight ones of this process and unrelated dot-files are kept."""
    dead_file = tmp_path / f".state.json.tmp-{DEAD_PID}-0123abcd"
    dead_dir = tmp_path / f".ckpt-000100.tmp-{DEAD_PID}-89abcdef"
    aside = tmp_path / f".tok.old-{DEAD_PID}-00112233"
    aside_done = tmp_path / f".ckpt.old-{DEAD_PID}-00112244"     # its target exists: the swap completed
    live = tmp_path / f".x.json.tmp-{os.getppid()}-0badf00d"
    other = tmp_path / ".gitignore"
    dead_file.write_text("{")
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"12")
    aside.mkdir()
    (aside / "tokenizer.model").write_bytes(b"m")
    aside_done.mkdir()
    (tmp_path / "ckpt").mkdir()
    live.write_text("1")
    other.write_text("x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead_file, dead_dir, aside_done])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".gitignore", live.name, "ckpt", "tok"])
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == b"m"
    with atomic_dir(tmp_path / "new") as d:
        assert remove_stale_temps(tmp_path) == [] and d.exists()      # our own in-flight temporary is kept
    assert remove_stale_temps(tmp_path / "missing") == []


@pytest.fixture
def st_file(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(5, 3), "b": torch.ones(4, dtype=torch.bfloat16), "c": torch.zeros(0, 2),
               "d": torch.tensor([7])}, str(p), metadata={"format": "pt"})
    return p


def test_check_safetensors_matches_library(st_file):
    """check_safetensors reports the names, dtypes and shapes that safetensors' own reader reports."""
    from safetensors import safe_open
    with safe_open(str(st_file), "pt") as f:
        theirs = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    assert check_safetensors(st_file) == theirs
    assert theirs["a"] == ("F32", (5, 3)) and theirs["c"] == ("F32", (0, 2))


def test_check_safetensors_detects_every_truncation(st_file, tmp_path):
    """The file cut at every shorter length (also inside the header or the 8-byte length) and with trailing bytes is
    rejected with a one-line FileFormatError naming the file."""
    data = st_file.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in [*range(len(data)), None]:
        bad.write_bytes(data[:cut] if cut is not None else data + b"\0")
        with pytest.raises(FileFormatError) as e:
            check_safetensors(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value), cut


def _with_header(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize("header, data, why", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "starts at 4"),
    ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "bad shape"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "no dtype/shape/data_offsets"),
    ([1, 2], b"", "not a JSON object"),
])
def test_check_safetensors_rejects_corrupt_headers(tmp_path, header, data, why):
    """Headers whose sizes, offsets, dtypes or shapes do not add up are rejected with the reason."""
    p = tmp_path / "x.safetensors"
    p.write_bytes(_with_header(header, data))
    with pytest.raises(FileFormatError, match=why):
        check_safetensors(p)


def test_no_pickle_in_files_module():
    """files.py reads and writes only JSON, bytes and safetensors: no pickle or torch.load anywhere."""
    src = open(files.__file__).read()
    assert "pickle" not in src and "torch.load" not in src
