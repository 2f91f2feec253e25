"""evaluate_flat.py end to end on two tiny trained pipelines, and its bad-input errors."""

import json
import sys

import pytest
from conftest import REPO, micro_args, run_command, run_training
from PIL import Image

SCRIPT = REPO / "training_scripts" / "evaluate_flat.py"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, micro_unet_config):
    root = tmp_path_factory.mktemp("models")
    run_training(*micro_args(root / "adm", micro_unet_config, "--max_train_steps", "3", "--use_ema"))
    run_training(*micro_args(root / "sam", micro_unet_config, "--max_train_steps", "3", "--use_ema", "--sam_rho",
                             "0.1"))  # fmt: skip
    return root / "adm", root / "sam"


def evaluate(*args):
    return run_command([sys.executable, str(SCRIPT), *map(str, args)])


def test_two_models_get_json_table_and_every_plot(two_models, tmp_path):
    out = tmp_path / "eval"
    small = ["--num_samples", 100, "--inference_steps", 2, 4, "--num_real", 100, "--lpf_draws", 3, "--gammas", 0,
             5, 10, "--directions", 2, "--surface_resolution", 3, "--exposure_samples", 8, "--loss_samples",
             32]  # fmt: skip
    result = evaluate("--model_path", *two_models, "--variant", "ema", "--output_dir", out, *small)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert list(results) == ["adm-ema", "sam-ema"]
    for name, r in results.items():
        assert set(r["fid"]) == {"2", "4"} and all(v > 0 for v in r["fid"].values())
        assert r["fid_num_generated"] == 100 and r["fid_num_real"] == 100
        assert r["lpf"]["num_draws"] == 3 and r["lpf"]["lpf"] > 0
        assert r["perturbation"]["gamma"] == [0.0, 5.0, 10.0] and r["perturbation"]["loss"][0] == r["loss"]
        assert len(r["exposure_bias"]["timesteps"]) == 4
        assert 0 <= r["memorization"]["memorization_ratio"] <= 1
        assert json.loads((out / name / "eval_results.json").read_text()) == r
        assert f"| {name} |" in (out / name / "results.md").read_text()
        for png in ("memorization.png", "samples_2_steps.png", "samples_4_steps.png"):
            Image.open(out / name / png).verify()
    for png in ("perturbation.png", "loss_surface.png", "exposure_bias.png"):
        Image.open(out / png).verify()
    table = (out / "results.md").read_text()
    assert "| adm-ema |" in table and "| sam-ema |" in table and "FID (2 steps)" in table
    assert "100 generated and 100 real images" in table


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model_path", "{tmp}"], "not a DDPMPipeline directory"),
        (["--model_path", "{adm}", "--metrics", "fid", "sharpness"], "--metrics: unknown sharpness"),
        (["--model_path", "{adm}", "--variant", "swa"], "--variant swa: {adm} was trained without --use_swa"),
        (
            ["--model_path", "{adm}", "--num_samples", "10"],
            "--num_samples 10 is too few for a meaningful FID: use at least 100",
        ),
    ],
)
def test_bad_input(two_models, tmp_path, flags, message):
    fill = {"tmp": tmp_path, "adm": two_models[0]}
    result = evaluate(*[f.format(**fill) for f in flags], "--output_dir", tmp_path / "out")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message.format(**fill) in errors[0], result.stderr[-2000:]
