"""The study file's schema: every key, what its value must be (in words, for the error, and as a test) and which keys
a mapping requires, in one table that a whole file is checked against before any of it is read (`check`). What
refers to the rest of the file (a method of the study, a seed outside the grid, a level the evaluation measures) is
checked where the parts are built, in config.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Value:
    """What one value must be: `words` for the error ("a whole number >= 1"), `test` deciding it."""

    words: str
    test: Callable[[Any], bool]


@dataclass(frozen=True)
class Section:
    """A mapping of known keys; `required` ones must be there, any other key is an error.

    Example:
        >>> schema = Section({"bits": whole(2)}, required=("bits",))
        >>> check({"bits": 1}, schema, "fraction_kept")
        Traceback (most recent call last):
        ...
        diffusers_flat.studies.schema.SchemaError: fraction_kept.bits must be a whole number >= 2, got 1
    """

    keys: dict[str, Value | Section | Items]
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class Items:
    """A list whose every item is a `Section` (e.g. the declared claims)."""

    item: Section


class SchemaError(ValueError):
    """A study file that does not have the schema's shape; its message names the key."""


def whole(minimum: int) -> Value:
    return Value(f"a whole number >= {minimum}", lambda v: type(v) is int and v >= minimum)


def one_of(*choices: str) -> Value:
    return Value(f"one of {', '.join(choices)}", lambda v: v in choices)


def list_of(value: Value, plural: str) -> Value:
    """A non-empty list of `value`s, none repeated: "a list of <plural>, none repeated"."""

    def test(v) -> bool:
        return isinstance(v, list) and bool(v) and all(map(value.test, v)) and len(set(map(str, v))) == len(v)

    return Value(f"a list of {plural}, none repeated", test)


def either(value: Value, items: Value) -> Value:
    """One value, or a list of them (a claim's treated methods and levels: one claim each)."""
    return Value(f"{value.words}, or {items.words}", lambda v: items.test(v) if isinstance(v, list) else value.test(v))


def _is_flags(v) -> bool:
    return isinstance(v, list) and all(isinstance(f, (str, int, float)) for f in v)


def _is_level(v) -> bool:
    bits, _, granularity = str(v).partition(":")
    return bits.isdigit() and granularity in ("per_tensor", "per_channel")


def _is_runs(v) -> bool:
    seeds = list_of(whole(0), "seeds").test
    return isinstance(v, dict) and bool(v) and all(map(seeds, v.values()))


TEXT = Value("a string", lambda v: isinstance(v, str) and bool(v))
FLAGS = Value("a list of flags and values", _is_flags)
LEVEL = Value('B:granularity, e.g. "4:per_channel"', _is_level)


def flags_by(names: str, empty: bool = True) -> Value:
    """A mapping of `names` (methods, variants) to their flags; `empty`: whether it may map nothing."""
    return Value(
        f"a mapping of {names} to lists of flags and values",
        lambda v: isinstance(v, dict) and (empty or bool(v)) and all(_is_flags(flags or []) for flags in v.values()),
    )


VARIANT = one_of("raw", "ema", "swa")
CLAIM = Section(
    {
        "measure": TEXT,  # a name of claims.MEASURES: checked with the words of the measures
        "base": TEXT,
        "treated": either(TEXT, list_of(TEXT, "methods")),
        "variant": VARIANT,
        "level": either(LEVEL, list_of(LEVEL, "levels")),
        "steps": whole(1),
    },
    required=("measure", "base", "treated", "variant"),
)
STUDY = Section(
    {
        "seeds": list_of(whole(0), "whole numbers >= 0"),
        "methods": flags_by("methods (ADM, IP, SAM or METHOD-TAG, e.g. SAM-rho0.01)", empty=False),
        "recipe": TEXT,
        "training": FLAGS,
        "evaluation": FLAGS,
        "variants": list_of(VARIANT, "raw, ema, swa"),
        "tuning": Section(
            {
                "method": TEXT,
                "flag": Value("a training flag such as --sam_rho", lambda v: isinstance(v, str) and v[:2] == "--"),
                "values": list_of(Value("", lambda v: isinstance(v, (str, int, float))), "the flag's values"),
                "seed": whole(0),
                "select": Section(
                    {"metric": one_of("fid", "kid"), "inference_steps": whole(1), "variant": VARIANT},
                    required=("metric", "inference_steps", "variant"),
                ),
                "baseline": TEXT,
                "evaluation": FLAGS,
            },
            required=("method", "flag", "values", "seed", "select"),
        ),
        "generalization": Section(
            {
                "subsets": list_of(whole(2), "training-set sizes, whole numbers >= 2"),
                "teacher": Section({"method": TEXT, "seed": whole(0)}, required=("method", "seed")),
                "teacher_training": FLAGS,
                "teacher_evaluation": FLAGS,
                "empirical_subset": whole(2),
                "temperatures": list_of(
                    Value("", lambda v: isinstance(v, (int, float)) and v > 0),
                    "numbers > 0 (1: the exact empirical score)",
                ),
                "empirical_evaluation": FLAGS,
                "noise_unconditional": Value("true or false", lambda v: isinstance(v, bool)),
            },
            required=("subsets", "teacher"),
        ),
        "reuse": Section(
            {"study": TEXT, "report": TEXT, "runs": Value("a mapping of methods to lists of seeds", _is_runs)},
            required=("study", "report", "runs"),
        ),
        "fraction_kept": Section(
            {"of": TEXT, "granularity": one_of("per_tensor", "per_channel"), "bits": whole(2)},
            required=("of", "granularity", "bits"),
        ),
        "variant_evaluation": flags_by("variants"),
        "resources": Section(
            {
                "num_cpus": Value("a number > 0", lambda v: isinstance(v, (int, float)) and v > 0),
                "num_gpus": Value("a number >= 0", lambda v: isinstance(v, (int, float)) and v >= 0),
            }
        ),
        "primary": CLAIM,
        "family": Items(CLAIM),
        "exploratory": Items(CLAIM),
        "figure": Section(
            {
                "rows": list_of(TEXT, "methods"),
                "variant": VARIANT,
                "level": LEVEL,
                "seeds": list_of(whole(0), "seeds"),
                "sampler": one_of("ddim", "ddpm"),
                "steps": whole(1),
                "noises": whole(1),
            },
            required=("rows", "variant", "level", "seeds"),
        ),
    },
    required=("seeds", "methods"),
)


def check(data: Any, schema: Section, where: str = "") -> None:
    """Raise `SchemaError` naming the first key (dotted, e.g. "tuning.select.metric") whose value `schema` does
    not allow; a key that is None counts as absent."""
    name = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise SchemaError(f"{where or 'the file'} must be a mapping with keys {', '.join(schema.keys)}")
    unknown = sorted(set(data) - set(schema.keys))
    if unknown:
        raise SchemaError(f"{name}{unknown[0]} is not a key; the keys are {', '.join(schema.keys)}")
    missing = [key for key in schema.required if data.get(key) is None]
    if missing:
        raise SchemaError(f"{name}{missing[0]} is missing; {where or 'a study'} needs {', '.join(schema.required)}")
    for key, value in data.items():
        spec = schema.keys[key]
        if value is None:
            continue
        if isinstance(spec, Section):
            check(value, spec, name + key)
        elif isinstance(spec, Items):
            if not isinstance(value, list):
                raise SchemaError(f"{name}{key} must be a list of claims")
            for i, item in enumerate(value):
                check(item, spec.item, f"{name}{key}[{i}]")
        elif not spec.test(value):
            raise SchemaError(f"{name}{key} must be {spec.words}, got {value}")
