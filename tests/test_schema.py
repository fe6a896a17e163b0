"""Every config field declares its allowed values in its type, and every declaration is enforced: a walk over
every field of every section tries values of the wrong type, out of range, non-finite, too large for the
integers downstream, empty and negative lists and list entries out of range. Each is refused in one line
before anything runs (or, at the lowest allowed values, the run either trains or is refused that way)."""

import dataclasses
import math
import typing
from pathlib import Path
from typing import Annotated, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import EXPERIMENT, TINY, assert_clear, run_cli

from lctrun.config import ConfigError, Experiment, Length, Range, hints, load_experiment


def walk(cls: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted key, annotated type) of every field of every section."""
    out = []
    for name, tp in hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out += walk(tp, f"{prefix}{name}.")
        else:
            out.append((prefix + name, tp))
    return out


FIELDS = walk(Experiment)


def parts(tp) -> tuple[typing.Any, list]:
    """(the type inside Annotated, its rules)."""
    if typing.get_origin(tp) is Annotated:
        inner, *rules = typing.get_args(tp)
        return inner, rules
    return tp, []


def options(tp) -> list:
    """The members of a union (None left out), else [tp]."""
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def undeclared(tp) -> list[str]:
    """The parts of a field's type that declare no allowed values (bare int, float, str)."""
    missing = []
    for option in options(tp):
        inner, rules = parts(option)
        if typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner)
            missing += undeclared(item) + ["list length"] * (not any(isinstance(r, Length) for r in rules))
        elif inner is bool or typing.get_origin(inner) is Literal:
            pass
        elif not rules:
            missing.append(getattr(inner, "__name__", str(inner)))
    return missing


def test_every_field_declares_its_allowed_values():
    assert len(FIELDS) > 50
    assert {key: undeclared(tp) for key, tp in FIELDS if undeclared(tp)} == {}


def bad_values(tp) -> list:
    """Values a field of type `tp` must refuse, whatever it is."""
    bad = [{"a": 1}]  # a mapping is never a leaf value
    for option in options(tp):
        inner, rules = parts(option)
        ranges = [r for r in rules if isinstance(r, Range)]
        if typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner)
            item_inner, item_rules = parts(item)
            bad += [[{"a": 1}], ["x", {"a": 1}]]
            bad += [[v] for v in bad_values(item) if not isinstance(v, dict)][:6]  # an entry out of range
            bad += [[]] * any(isinstance(r, Length) and r.low > 0 for r in rules)  # an empty list
            bad += [[1] * 2000]  # longer than any list a run takes
        elif inner is int:
            bad += [1.5, "two", True, 2**31, 2**63, 2**64, 10**30, -(2**63), ".nan", ".inf", "-.inf"]
            bad += [r.low - 1 for r in ranges if math.isfinite(r.low)]
            bad += [r.high + 1 for r in ranges if math.isfinite(r.high)]
        elif inner is float:
            bad += ["fast", True, ".nan", ".inf", "-.inf", "1e400"]
            bad += [r.low - 1 for r in ranges if math.isfinite(r.low)] + [r.low for r in ranges if r.low_open]
            bad += [r.high + 1 for r in ranges if math.isfinite(r.high)] + [r.high for r in ranges if r.high_open]
        elif inner is str:
            bad += ["", "a\nb", "\x00", "x" * 300]
        elif typing.get_origin(inner) is Literal:
            bad += ["not-a-choice", 12345]
    if all(typing.get_origin(parts(o)[0]) is not list for o in options(tp)):
        bad.append([[1]])  # a nested list, for a scalar field
    return bad


CASES = [(key, value) for key, tp in FIELDS for value in bad_values(tp)]


def override(key: str, value) -> str:
    """KEY=VALUE with VALUE as YAML (the non-finite floats spelled as YAML spells them)."""
    if isinstance(value, str) and value.startswith((".", "-.", "1e")):
        return f"{key}={value}"
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={str(v)[:20]}" for k, v in CASES])
def test_every_field_refuses_what_its_declaration_excludes_in_one_line(key, value):
    with pytest.raises(ConfigError) as e:
        load_experiment(None, [override(key, value)])
    assert_clear(e.value)
    assert key.split(".")[-1] in str(e.value) or "not one of" in str(e.value), str(e.value)


def lowest(tp):
    """The lowest value a field's declaration allows (None where null is allowed, the first choice of a
    Literal, False, a list of the lowest length made of its entries' lowest values)."""
    if type(None) in typing.get_args(tp):
        return None
    inner, rules = parts(options(tp)[0])
    if typing.get_origin(inner) is list:
        size = max([r.low for r in rules if isinstance(r, Length)], default=0)
        return [lowest(typing.get_args(inner)[0])] * size
    if typing.get_origin(inner) is Literal:
        return typing.get_args(inner)[0]
    if inner is bool:
        return False
    for rule in rules:
        if isinstance(rule, Range) and math.isfinite(rule.low):
            return (1e-6 if inner is float else 1) + rule.low if rule.low_open else inner(rule.low)
    return None  # a string: its default (checked by the walk above)


LOW = [(key, lowest(tp)) for key, tp in FIELDS if lowest(tp) is not None or type(None) in typing.get_args(tp)]


@settings(max_examples=15, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(LOW))
def test_each_field_at_its_lowest_allowed_value_trains_or_is_refused_cleanly(tmp_path_factory, case):
    """A tiny run with one field at the lowest value its declaration allows: exit 0, or exit 2 with one line
    and no run directory (e.g. batch size 1 with batch norm), never a traceback."""
    key, value = case
    out = tmp_path_factory.mktemp("run") / "run"
    text = "null" if value is None else override(key, value).split("=", 1)[1]
    code, err = run_cli(["train", str(EXPERIMENT), *TINY, "epochs=1", f"{key}={text}", "--out", str(out)])
    if code == 0:
        assert (out / "metrics.csv").exists()
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"{key}={text}: exit {code}: {err}"
    assert not Path(out).exists(), f"{key}={text} failed ({lines[0]}) but left a run directory"
