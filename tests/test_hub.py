"""Model cards and the Hub push. The Hub's servers cannot be reached here: the scripts run in fresh processes with
tests/hub_intercept on PYTHONPATH, which records HfApi's write calls instead of sending them, and any other outbound
call goes to a closed local port and fails. Loading by Hub id is tested through a Hub cache built from exactly the
files that were pushed."""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import push_to_hub
import pytest
from conftest import REPO, micro_args, run_cli, run_command, run_script
from huggingface_hub import HfApi, ModelCard

from diffusers_flat.hub.model_card import write_model_card

TOKEN = "hf_testTOKEN0123456789"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the cache names snapshots by full commit hashes
PIPELINE = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "sample_grid.png",
}


def intercepted_env(log: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests" / "hub_intercept"), HUB_INTERCEPT_LOG=str(log))
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")  # nothing real answers there
    return env


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, micro_unet_config):
    """A 3-step SAM+EMA run with a checkpoint, trained and pushed by the training script."""
    root = tmp_path_factory.mktemp("pushed")
    log = root / "hub_calls.jsonl"
    out = root / "run"
    args = micro_args(
        out,
        micro_unet_config,
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "2",
        "--use_ema",
        "--sam_rho",
        "0.1",
        "--push_to_hub",
        "--hub_model_id",
        "someone/flat-micro",
        "--hub_private_repo",
        "--hub_token",
        TOKEN,
    )
    result = run_script("train_flat_ddpm", *args, env=intercepted_env(log))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, calls(log)


@pytest.mark.slow
def test_training_pushes_pipelines_card_and_nothing_else(pushed_run):
    out, hub_calls = pushed_run
    assert [c["call"] for c in hub_calls] == ["create_repo", "create_commit"]
    create, commit = hub_calls
    assert create["repo_id"] == "someone/flat-micro" and create["private"] is True and create["token"] == TOKEN
    assert commit["repo_id"] == "someone/flat-micro" and commit["token"] == TOKEN
    expected = PIPELINE | {f"ema/{name}" for name in PIPELINE} | {"README.md", "training_args.json"}
    assert set(commit["files"]) == expected
    assert (out / "checkpoint-2").is_dir() and (out / "logs").is_dir()  # present locally, never pushed
    for name, entry in commit["files"].items():
        assert TOKEN.encode() not in Path(entry["source"]).read_bytes(), name
    assert "hub_token" not in json.loads((out / "training_args.json").read_text())


@pytest.mark.slow
def test_card_written_at_end_of_training(pushed_run):
    out, _ = pushed_run
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.license == "apache-2.0"
    assert {"sam", "ema", "diffusers-flat"} <= set(card.data.tags) and "swa" not in card.data.tags
    assert 'DDPMPipeline.from_pretrained("someone/flat-micro")' in card.text
    assert 'subfolder="ema/unet"' in card.text and "![Samples](sample_grid.png)" in card.text
    assert "| sam_rho | 0.1 |" in card.text
    assert card.data.eval_results is None and "Not evaluated yet" in card.text


def hub_cache_from_commit(commit: dict, hf_home: Path) -> None:
    """Lay the pushed files out as huggingface_hub's cache holds a downloaded repo."""
    repo = hf_home / "hub" / ("models--" + commit["repo_id"].replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, entry in commit["files"].items():
        target = repo / "snapshots" / COMMIT / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry["source"], target)


LOAD_BY_ID = """
import sys, torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
repo, local = sys.argv[1], sys.argv[2]
pipeline = DDPMPipeline.from_pretrained(repo)
ema = UNet2DModel.from_pretrained(repo, subfolder="ema/unet")
DDPMScheduler.from_pretrained(repo, subfolder="ema/scheduler")
assert "diffusers_flat" not in sys.modules
x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
for model, path in ((pipeline.unet, local), (ema, local + "/ema")):
    assert torch.equal(model(x, t).sample, UNet2DModel.from_pretrained(path, subfolder="unet")(x, t).sample)
print("loaded", type(pipeline).__name__)
"""


@pytest.mark.slow
def test_pushed_repo_loads_by_id_with_plain_from_pretrained(pushed_run, tmp_path):
    out, (_, commit) = pushed_run
    hub_cache_from_commit(commit, tmp_path / "hf_home")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = run_command([sys.executable, "-c", LOAD_BY_ID, "someone/flat-micro", str(out)], tmp_path, 300, env)
    assert result.returncode == 0 and "loaded DDPMPipeline" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_standalone_push_of_an_evaluated_dir(pushed_run, tmp_path):
    """After evaluation, the card carries the results and the push command uploads them with their plots."""
    source, _ = pushed_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    small = "--variant ema --metrics lpf perturbation --lpf_draws 2 --gammas 0 5 --directions 1 --loss_samples 16"
    result = run_script("evaluate_flat", "--model_path", out, *small.split(), "--output_dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    lpf = json.loads((tmp_path / "eval" / "run-ema" / "eval_results.json").read_text())["lpf"]["lpf"]
    card = ModelCard.load(out / "README.md")
    [metric] = card.data.eval_results
    assert metric.metric_type == "lpf" and metric.metric_value == pytest.approx(lpf, abs=1e-4)
    assert "EMA weights" in metric.metric_name
    assert "![Loss under random weight perturbation (EMA weights)](ema/evaluation/perturbation.png)" in card.text

    # A card template of the user's own (as model_cards/ suggests) replaces the shipped one.
    template = tmp_path / "my_card.md"
    template.write_text("---\n{{ card_data }}\n---\n\n# {{ model_name }}, our lab's card\n\n{{ evaluation }}\n")
    log = tmp_path / "hub_calls.jsonl"
    push = ["--model_path", out, "--hub_model_id", "someone/other-name", "--model_card_template", template]
    result = run_script("push_to_hub", *push, env=intercepted_env(log))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pushed" in result.stdout and "someone/other-name" in result.stdout
    create, commit = calls(log)
    assert create["private"] is False
    evaluation = {"ema/evaluation/eval_results.json", "ema/evaluation/results.md", "ema/evaluation/perturbation.png"}
    assert evaluation <= set(commit["files"])
    assert not any(name.startswith(("checkpoint-", "logs/")) for name in commit["files"])
    pushed_card = ModelCard.load(out / "README.md")
    assert (
        "# someone/other-name, our lab's card" in pushed_card.text
        and "## Training configuration" not in pushed_card.text
    )
    assert "| someone/other-name-ema |" in pushed_card.text and pushed_card.data.eval_results[0].metric_type == "lpf"
    assert commit["files"]["README.md"]["sha256"] == hashlib.sha256((out / "README.md").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model_path", "{tmp}", "--hub_model_id", "a/b"], "not a DDPMPipeline directory"),
        (["--model_path", "{run}"], "the following arguments are required: --hub_model_id"),
    ],
)
def test_push_bad_input(two_models, tmp_path, args, message, monkeypatch, capsys):
    def no_upload(*args, **kwargs):
        raise AssertionError("bad input reached the Hub")

    monkeypatch.setattr(HfApi, "create_repo", no_upload)
    monkeypatch.setattr(HfApi, "create_commit", no_upload)
    fill = {"tmp": tmp_path, "run": two_models[0]}
    status, stderr = run_cli(push_to_hub, [a.format(**fill) for a in args], capsys)
    assert status != 0
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]


@pytest.mark.slow
def test_offline_push_is_refused_before_training(micro_unet_config, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "training_scripts" / "train_flat_ddpm.py"),
        *micro_args(out, micro_unet_config, "--max_train_steps", "1", "--push_to_hub"),
    ]
    result = run_command(command, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 1 and not out.exists()
    assert "--push_to_hub: HF_HUB_OFFLINE is set" in result.stderr.strip().splitlines()[-1]


def test_card_metadata_and_table_4_from_results(tmp_path):
    """A card built from hand-written results: model-index values and the Table 4 cells, computed by hand."""
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "training_args.json").write_text(
        json.dumps(
            {
                "sam_rho": 0.1,
                "sam_adaptive": True,
                "sam_ascent": "global",
                "use_swa": True,
                "swa_start_step": 90,
                "swa_cycle": 10,
                "input_perturbation": 0.1,
                "dataset_name": "cifar10",
            }
        )
    )
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    results = {
        "fid": {"20": 12.0, "100": 5.25},
        "fid_num_generated": 1000,
        "fid_num_real": 1000,
        "quantization": {"granularity": "per_tensor", "fid": {"8": {"20": 15.5, "100": 5.0}}},
        "lpf": {"lpf": 0.0631, "stderr": 0.001, "sigma": 0.01},
        "exposure_bias": {"squared_norm_gap": 3.32},
    }
    (evaluation / "eval_results.json").write_text(json.dumps(results))
    card = ModelCard.load(write_model_card(tmp_path, "me/asam"))
    assert card.data.datasets == ["cifar10"]
    assert {"asam", "swa", "input-perturbation"} <= set(card.data.tags)
    metrics = {m.metric_name: m.metric_value for m in card.data.eval_results}
    assert metrics == {
        "FID (20 steps, 1000 samples)": 12.0,
        "FID (100 steps, 1000 samples)": 5.25,
        "FID (20 steps, 8-bit weights)": 15.5,
        "FID (100 steps, 8-bit weights)": 5.0,
        "LPF flatness (sigma 0.01)": 0.0631,
        "Exposure bias gap, squared norm": 3.32,
    }
    assert {m.dataset_type for m in card.data.eval_results} == {"cifar10"}
    assert "| me/asam | 20 | 12.00 | 12.00 → 15.50 (+3.50) |" in card.text
    assert "| me/asam | 100 | 5.25 | 5.25 → 5.00 (-0.25) |" in card.text
    assert "| me/asam | 12.00 | 5.25 | 0.0631 ± 0.0010 | +3.320 | - |" in card.text
    assert not (tmp_path / "README.md.partial").exists()
