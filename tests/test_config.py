"""config.py directly: fields checked against their types and choices, JSON/YAML files, unknown keys warned about."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from vptune.config import check_fields, from_dict, option, read_config_file, to_dict


@dataclass
class Example:
    name: str = option("a", "a name", choices=("a", "b"))
    count: int = option(1, "how many")
    scale: float = option(0.5, "a float; an int is accepted")
    blocks: list[int] | None = option(None, "optional list of ints")
    flag: bool = option(False, "a switch")

    def __post_init__(self) -> None:
        check_fields(self)


def test_help_and_choices_are_field_metadata() -> None:
    field = Example.__dataclass_fields__["name"]
    assert field.metadata == {"help": "a name", "choices": ("a", "b")} and field.default == "a"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "c"}, "Example: unknown name 'c'; choose one of a, b"),
        ({"count": "3"}, "Example: count must be int, got '3'"),
        ({"count": True}, "count must be int"),  # a bool is not a count
        ({"count": 1.5}, "count must be int"),
        ({"scale": [1]}, "scale must be float"),
        ({"blocks": [1, "x"]}, "blocks must be"),
        ({"blocks": 3}, "blocks must be"),
        ({"flag": "yes"}, "flag must be bool"),
    ],
)
def test_wrong_types_and_choices_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Example(**values)


def test_right_values_pass() -> None:
    assert Example(name="b", count=2, scale=1, blocks=[0, -1], flag=True).scale == 1
    assert Example(blocks=(1, 2)).blocks == (1, 2)


def test_round_trip_and_unknown_keys_warn() -> None:
    example = Example(name="b", blocks=[1])
    data = to_dict(example)
    assert data == {"name": "b", "count": 1, "scale": 0.5, "blocks": [1], "flag": False}
    assert from_dict(Example, data) == example
    with pytest.warns(UserWarning, match=r"run.yaml: ignoring unknown Example keys \['future'\]"):
        assert from_dict(Example, {**data, "future": 1}, where="run.yaml") == example
    with pytest.raises(ValueError, match="expected a mapping of Example options, got list"):
        from_dict(Example, [1])


def test_config_files(tmp_path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"train": {"epochs": 2}}))
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 2\n")
    assert read_config_file(tmp_path / "a.json") == read_config_file(tmp_path / "a.yaml") == {"train": {"epochs": 2}}
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        read_config_file(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_config_file(tmp_path / "none.json")
