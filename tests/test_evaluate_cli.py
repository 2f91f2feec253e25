"""evaluate_flat.py end to end on two tiny trained pipelines, and its bad-input errors."""

import json
import shutil
import sys

import pytest
from conftest import REPO, micro_args, run_command, run_training
from huggingface_hub import ModelCard
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


def test_quantized_fid_gives_table_4_plots_and_card(two_models, tmp_path):
    model = tmp_path / "sam"
    shutil.copytree(two_models[1], model)
    out = tmp_path / "eval"
    result = evaluate("--model_path", model, "--metrics", "fid", "--num_samples", 100, "--num_real", 100,
                      "--inference_steps", 2, "--quantize", 8, 4, "--quantize_granularity", "per_channel",
                      "--output_dir", out)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((out / "eval_results.json").read_text())["sam"]
    assert r["quantization"]["granularity"] == "per_channel"
    fp32, q8, q4 = r["fid"]["2"], r["quantization"]["fid"]["8"]["2"], r["quantization"]["fid"]["4"]["2"]
    assert min(fp32, q8, q4) > 0
    cells = [f"{fp32:.2f} → {q:.2f} ({q - fp32:+.2f})" for q in (q8, q4)]
    row = f"| sam | 2 | {fp32:.2f} | {cells[0]} | {cells[1]} |"
    assert row in (out / "results.md").read_text()
    for png in (out / "fid_vs_bits.png", out / "sam" / "fid_vs_bits.png", out / "sam" / "samples_2_steps_4bit.png"):
        Image.open(png).verify()
    # The pipeline dir keeps the evaluation, and its card now reports it.
    assert json.loads((model / "evaluation" / "eval_results.json").read_text()) == r
    Image.open(model / "evaluation" / "fid_vs_bits.png").verify()
    card = ModelCard.load(model / "README.md")
    metrics = {m.metric_name: m.metric_value for m in card.data.eval_results}
    assert metrics["FID (2 steps, 8-bit weights)"] == pytest.approx(q8, abs=1e-4)
    assert metrics["FID (2 steps, 100 samples)"] == pytest.approx(fp32, abs=1e-4)
    assert row in card.text and "![FID against weight bits](evaluation/fid_vs_bits.png)" in card.text


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
        (["--model_path", "{adm}", "--quantize", "9"], "--quantize: bits must be from 2 to 8 (the paper: 8), got [9]"),
        (
            ["--model_path", "{adm}", "--metrics", "lpf", "--quantize", "8"],
            "--quantize reports FID before -> after quantization: add fid to --metrics",
        ),
        (["--model_path", "{adm}", "--quantize_granularity", "row"], "--quantize_granularity 'row': choose"),
    ],
)
def test_bad_input(two_models, tmp_path, flags, message):
    fill = {"tmp": tmp_path, "adm": two_models[0]}
    result = evaluate(*[f.format(**fill) for f in flags], "--output_dir", tmp_path / "out")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message.format(**fill) in errors[0], result.stderr[-2000:]
