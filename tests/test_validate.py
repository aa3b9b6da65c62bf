"""The validation module: typed rules for dataclass fields, unknown names with a hint, JSON objects checked on read."""
import dataclasses
import typing

import pytest

from dsv3_min.validate import check_json, check_names, rule, validate_fields


def test_validate_fields_on_any_dataclass():
    """validate_fields works for any dataclass declared with `rule` (the training config shares it): ranges, choices,
    regex patterns, optional types and custom checks, each with a one-line error naming class and field."""
    @dataclasses.dataclass
    class Knobs:
        lr: float = rule(1e-3, gt=0)
        frac: float = rule(0.5, ge=0, le=1)
        device: str = rule("auto", pattern=r"auto|cpu|cuda(:\d+)?")
        steps: int | None = None
        flag: bool = False
        name: str = rule("a", check=lambda v: None if v.isalpha() else "must be letters only")
        mode: typing.Literal["fast", "slow"] | None = "fast"

    validate_fields(Knobs(lr=2, device="cuda:1", steps=3))
    for kw, msg in [(dict(frac=1.5), "Knobs.frac=1.5: must be a float in [0, 1]"),
                    (dict(device="banana"), "Knobs.device='banana': must be a string matching 'auto|cpu|cuda(:\\d+)?'"),
                    (dict(steps=2.5), "Knobs.steps=2.5: must be an integer or None"),
                    (dict(flag="yes"), "Knobs.flag='yes': must be true or false"),
                    (dict(name="a1"), "Knobs.name='a1': must be letters only"),
                    (dict(lr="abc"), "Knobs.lr='abc': must be a float > 0"),
                    (dict(mode="medium"), "Knobs.mode='medium': must be one of ('fast', 'slow') or None")]:
        with pytest.raises(ValueError) as e:
            validate_fields(Knobs(**kw))
        assert str(e.value) == msg


def test_check_names_names_the_closest_valid_name():
    """Unknown keys are refused in one line with the closest valid name; known names pass."""
    check_names("X", {"a": 1}, ["a", "b"])
    with pytest.raises(ValueError, match=r"unknown X field 'bb' \(did you mean 'b'\?\); valid: a, b"):
        check_names("X", {"bb": 1}, ["a", "b"])


@pytest.mark.parametrize("value,message", [
    ([1, 2], "f.json: must hold a JSON object, got a list"),
    ("abc", "f.json: must hold a JSON object, got a string 'abc'"),
    (None, "f.json: must hold a JSON object, got null"),
    ({"files": {}}, "f.json: missing key 'step'"),
    ({"files": [], "step": 3}, "f.json: 'files' must be a dict, got a list"),
    ({"files": {}, "step": "3"}, "f.json: 'step' must be an integer, got a string '3'"),
    ({"files": {}, "step": True}, "f.json: 'step' must be an integer, got a boolean True"),
])
def test_check_json_refuses_other_shapes_in_one_line(value, message):
    """A JSON value read from a file must be an object holding the schema's keys with their types: a list, a missing
    key or a value of another type is one line naming the file and the key."""
    with pytest.raises(ValueError) as e:
        check_json("f.json", value, {"files": dict, "step": int})
    assert str(e.value) == message


def test_check_json_returns_a_valid_object_unchanged():
    """A well-formed object passes through, extra keys kept; without a schema only its being an object is checked."""
    d = {"files": {"a": 1}, "step": 3, "extra": [1]}
    assert check_json("f.json", d, {"files": dict, "step": int}) is d
    assert check_json("f.json", {}) == {}
