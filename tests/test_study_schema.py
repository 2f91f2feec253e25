"""The study file's one schema: the documented example file passes it whole, and a wrong value at any key of it, an
unknown key or a missing required key at any depth is one error naming that key's dotted path."""

import copy
import inspect

import pytest
import yaml

from diffusers_flat.studies import config
from diffusers_flat.studies.schema import STUDY, Items, SchemaError, Section, check


def documented_example() -> dict:
    """The example study file of config.py's docstring, read as YAML (its lines indented by four spaces)."""
    doc = inspect.getdoc(config)
    block = doc.split(":\n\n", 1)[1].split("\n\n", 1)[0]
    return yaml.safe_load("\n".join(line[4:] for line in block.splitlines()))


def leaves(data: dict, schema: Section, where: str = ""):
    """(dotted path, container, key) of every value of `data` the schema tests directly, walked by hand."""
    for key, value in data.items():
        path, spec = f"{where}.{key}" if where else key, schema.keys[key]
        if isinstance(spec, Section):
            yield from leaves(value, spec, path)
        elif isinstance(spec, Items):
            for i, item in enumerate(value):
                yield from leaves(item, spec.item, f"{path}[{i}]")
        else:
            yield path, data, key


def test_the_documented_example_has_every_section_and_passes():
    example = documented_example()
    assert set(example) == set(STUDY.keys)  # the example shows every key of a study file
    check(example, STUDY)


def test_a_wrong_value_anywhere_names_its_key():
    example = documented_example()
    paths = [path for path, _, _ in leaves(example, STUDY)]
    assert {
        "seeds",
        "tuning.select.metric",
        "generalization.teacher.seed",
        "family[0].treated",
        "figure.noises",
    } <= set(paths)
    for index, path in enumerate(paths):
        broken = copy.deepcopy(example)
        _, container, key = list(leaves(broken, STUDY))[index]
        container[key] = object()  # no key allows it
        with pytest.raises(SchemaError) as error:
            check(broken, STUDY)
        assert str(error.value).startswith(f"{path} must be "), (path, str(error.value))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["tuning"]["select"].update(seed=3), "tuning.select.seed is not a key; the keys are metric"),
        (lambda s: s["tuning"].pop("seed"), "tuning.seed is missing; tuning needs method, flag, values, seed, select"),
        (lambda s: s.pop("methods"), "methods is missing; a study needs seeds, methods"),
        (lambda s: s.update(seed=[1]), "seed is not a key; the keys are seeds, methods"),
        (lambda s: s["family"].append({"measure": "lpf"}), "family[1].base is missing"),
        (lambda s: s.update(figure=[1]), "figure must be a mapping with keys rows, variant, level, seeds"),
        (lambda s: s.update(family={"measure": "lpf"}), "family must be a list of claims"),
        (lambda s: s["fraction_kept"].update(bits=1), "fraction_kept.bits must be a whole number >= 2, got 1"),
        (lambda s: s.update(seeds=[1, 1]), "seeds must be a list of whole numbers >= 0, none repeated, got [1, 1]"),
    ],
)
def test_unknown_missing_and_wrong_keys_are_one_line_naming_them(change, message):
    study = documented_example()
    change(study)
    with pytest.raises(SchemaError) as error:
        check(study, STUDY)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_key_set_to_nothing_is_absent():
    study = documented_example()
    study.update(tuning=None, recipe=None, figure=None)
    check(study, STUDY)
