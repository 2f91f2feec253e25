"""Evaluation results read back typed: T' and bits as ints, levels as `Level`, absent metrics None, results of every
version read alike, and a committed study's results written back exactly as they were stored."""

import json

import pytest
from conftest import REPO

from diffusers_flat.evaluation.measurements import NOT_MEASURED, Level, Measurements, json_results, read_results

WRITTEN = {
    "fid": {"100": 20.0, "20": 31.5},
    "kid": {"100": {"mean": 0.011, "std": 0.001}, "20": {"mean": 0.017, "std": 0.002}},
    "fid_num_generated": 1000,
    "loss": 0.04,
    "quantization": {
        "sampler": "ddim",
        "levels": {
            "4:per_channel": {
                "bits": 4,
                "granularity": "per_channel",
                "fid": {"20": 40.0},
                "kid": {"20": {"mean": 0.03}},
                "pixel_displacement": {"20": 12.5},
                "class_fidelity": {"20": {"kept": 0.75}},
                "loss_increase": 0.002,
            },
            "3:per_tensor": {"bits": 3, "granularity": "per_tensor", "fid": {"20": 90.0}, "loss_increase": 0.02},
        },
    },
    "sensitivity": {"curves": {"per_channel": {"8": {"loss_increase": 1e-5}}}, "num_samples": 4, "steps": 10},
}


def test_keys_become_ints_and_levels_their_bits_and_granularity():
    m = Measurements.from_json(WRITTEN)
    assert m.fid == {100: 20.0, 20: 31.5} and m.kid[20]["mean"] == 0.017 and m.first_steps == 20
    assert m.fid_num_generated == 1000 and m.fid_num_real is None and m.loss == 0.04
    four = m.at(Level(4, "per_channel"))
    assert four.fid == {20: 40.0} and four.kid[20]["mean"] == 0.03 and four.pixel_displacement == {20: 12.5}
    assert four.class_fidelity[20]["kept"] == 0.75 and four.loss_increase == 0.002
    assert m.at(Level.parse("3:per_tensor")).fid == {20: 90.0} and m.at(Level(3, "per_tensor")).kid == {}
    assert m.sensitivity.curves == {"per_channel": {8: {"loss_increase": 1e-5}}} and m.sensitivity.steps == 10
    assert m.lpf is None and m.memorization is None and m.json is WRITTEN
    with pytest.raises(ValueError, match="mix granularities"):
        m.by_bits()  # 4 bits per channel and 3 per tensor: the bits alone do not name a level


def test_a_missing_measure_raises_what_the_reports_skip():
    m = Measurements.from_json({"fid": {"20": 31.5}})
    for measure in (lambda r: r.kid[20]["mean"], lambda r: r.lpf["lpf"], lambda r: r.sensitivity.curves):
        with pytest.raises(NOT_MEASURED):
            measure(m)
    assert m.first_steps is None and m.by_bits() == {}


def test_results_written_before_levels_had_a_granularity_read_alike():
    old = {
        "fid": {"20": 30.0},
        "quantization": {
            "granularity": "per_tensor",
            "fid": {"8": {"20": 30.5}, "4": {"20": 45.0}},
            "kid": {"8": {"20": {"mean": 0.01}}, "4": {"20": {"mean": 0.02}}},
            "loss_increase": {"8": 1e-6, "4": 1e-3},
            "pixel_displacement": {"8": {"20": 0.5}, "4": {"20": 9.0}},
        },
    }
    by_bits = Measurements.from_json(old).by_bits()
    assert sorted(by_bits) == [4, 8] and by_bits[4].level == Level(4, "per_tensor")
    assert by_bits[4].fid == {20: 45.0} and by_bits[8].loss_increase == 1e-6 and by_bits[4].pixel_displacement[20] == 9


def test_a_committed_studys_results_are_stored_back_as_they_were():
    stored = json.loads((REPO / "docs" / "study-cheap-sam" / "report.json").read_text())["results"]
    typed = read_results(stored)
    assert all(isinstance(seed, int) for seeds in typed.values() for seed in seeds)
    assert json.loads(json.dumps(json_results(typed))) == stored
