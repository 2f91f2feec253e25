"""The study runner: aggregation and verdicts against hand computations, sharding, bad study files, and a micro study
end to end (real trainings under accelerate, in-process evaluations) that survives being killed."""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import evaluate_flat
import numpy as np
import pytest
import run_study
from conftest import MICRO_UNET, REPO, TREE_MARKER, kill_tree, run_cli
from test_evaluate_cli import PooledPixels

from diffusers_flat.claims import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, paired_interval, verdict
from diffusers_flat.study import Study, shard_of

T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (from a table)


def test_paired_interval_is_the_t_interval_of_the_differences():
    a, b = [0.10, 0.12, 0.11], [0.07, 0.089, 0.081]
    d = [b[i] - a[i] for i in range(3)]  # -0.030, -0.031, -0.029
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    interval = paired_interval(a, b)
    assert interval["n"] == 3 and interval["mean"] == pytest.approx(mean)
    assert interval["low"] == pytest.approx(mean - T_975_2 * sd / math.sqrt(3))
    assert interval["high"] == pytest.approx(mean + T_975_2 * sd / math.sqrt(3))
    assert verdict(interval, -1) == HOLDS and verdict(interval, 1) == DOES_NOT_HOLD
    # the data flip, the verdict flips; a noisy effect is inconclusive; one pair gives no interval
    assert verdict(paired_interval(b, a), -1) == DOES_NOT_HOLD
    assert verdict(paired_interval([0.1, 0.1, 0.1], [0.2, 0.0, 0.12]), -1) == INCONCLUSIVE
    assert verdict(paired_interval([0.1], [0.0]), -1) == INCONCLUSIVE


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_partition_the_runs(count):
    study = Study(REPO / "s.yaml", (1, 2, 3), {"ADM": (), "IP": ("--input_perturbation", "0.1"), "SAM": ()})
    runs = study.runs()
    shards = [shard_of(runs, i, count) for i in range(1, count + 1)]
    assert sorted(r.name for s in shards for r in s) == sorted(r.name for r in runs)
    assert sum(len(s) for s in shards) == len(runs) == 9


def write_study(path, **overrides):
    study = {
        "seeds": [1, 2],
        "methods": {"ADM": [], "SAM": ["--sam_rho", "0.1"]},
        "training": ["--model_config_name_or_path", str(path.parent / "micro.json"), "--resolution", "8"]
        + ["--max_train_steps", "3", "--train_batch_size", "8", "--eval_batch_size", "2"]
        + ["--ddpm_num_inference_steps", "2", "--swa_start", "1", "--swa_cycle", "1", "--lr_warmup_steps", "0"],
        "evaluation": ["--metrics", "lpf", "perturbation", "exposure_bias", "--inference_steps", "2", "4"]
        + ["--lpf_draws", "3", "--loss_samples", "16", "--gammas", "0", "5", "10", "--directions", "1"]
        + ["--exposure_samples", "4"],
    }
    study.update(overrides)
    (path.parent / "micro.json").write_text(json.dumps(MICRO_UNET))
    path.write_text(json.dumps(study))  # JSON is YAML
    return path


BAD = {
    "missing": (None, "--study {path}: no file"),
    "not yaml": ("seeds: [1, 2\n", "not valid YAML"),
    "unknown method": ({"methods": {"ADM": [], "LION": []}}, "unknown method LION; choose from ADM, IP, SAM"),
    "repeated seed": ({"seeds": [1, 2, 1]}, "seed 1 is repeated"),
    "unknown training flag": ({"training": ["--learnig_rate", "1"]}, "unrecognized arguments: --learnig_rate 1"),
    "unknown metric": ({"evaluation": ["--metrics", "sharpness"]}, "--metrics: unknown sharpness"),
    "bad shard": ({}, "--shard 5/4: I must be from 1 to N"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_study_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    content, message = BAD[case]
    path = tmp_path / "study.yaml"
    if isinstance(content, dict):
        write_study(path, **content)
    elif isinstance(content, str):
        path.write_text(content)
    argv = ["--study", path, "--output_dir", tmp_path / "out"] + (["--shard", "5/4"] if case == "bad shard" else [])
    status, err = run_cli(run_study, argv, capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status != 0 and len(errors) == 1 and message.format(path=path) in errors[0], err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_every_run_and_evaluation(tmp_path, capsys):
    path = write_study(tmp_path / "study.yaml")
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(tmp_path / "out"), "--dry_run"]))
    printed = capsys.readouterr().out
    assert "4 trainings and 12 evaluations (shard 1/1)" in printed and "(+SAM+SWA)" in printed
    # 2 seeds x (ADM: 3 steps, SAM: 3 steps of two passes); 12 pipelines x 1,000 samples x T' = 2 and 4
    assert "work: 18 forward-backward passes of training (a SAM step is two); 24,000 generated images " in printed
    assert "(72,000 UNet image-steps)" in printed
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_micro_study_survives_a_kill_and_reports_every_table(tmp_path, monkeypatch):
    path = write_study(tmp_path / "study.yaml")
    out = tmp_path / "out"
    # Killed while training its second run: the first run and its three evaluations are finished by then.
    marker = "study-kill-test"
    command = [sys.executable, str(REPO / "training_scripts" / "run_study.py"), "--study", str(path)]
    process = subprocess.Popen(
        [*command, "--output_dir", str(out)], env={**os.environ, TREE_MARKER: marker}, cwd=REPO, start_new_session=True
    )
    second_log = out / "logs" / "sam-seed1.log"
    deadline = time.monotonic() + 300
    while not second_log.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_tree(marker)
    process.wait(timeout=30)
    assert second_log.exists(), "the study never reached its second training"
    done = [*(out / "eval").glob("adm-seed1-*/eval_results.json"), out / "runs" / "adm-seed1" / "model_index.json"]
    finished = {p: p.stat().st_mtime_ns for p in done}
    assert len(finished) == 4 and (out / "done" / "adm-seed1").exists()

    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(out)]))
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # neither retrained nor evaluated again
    data = json.loads((out / "report.json").read_text())
    assert set(data["results"]) == {"ADM", "+EMA", "+SWA", "+SAM", "+SAM+EMA", "+SAM+SWA"}
    lpf_claim = next(c for c in data["claims"] if c["claim"] == "SAM lowers LPF relative to ADM")
    adm = [data["results"]["ADM"][s]["lpf"]["lpf"] for s in ("1", "2")]
    sam = [data["results"]["+SAM"][s]["lpf"]["lpf"] for s in ("1", "2")]
    assert lpf_claim["interval"]["mean"] == pytest.approx(np.mean(np.subtract(sam, adm)))
    assert lpf_claim["interval"]["n"] == 2 and lpf_claim["verdict"] in (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)

    # The same trainings evaluated with FID, KID and 8-bit weights too (a pooled-pixel stand-in for InceptionV3):
    # every table of the report.
    full = write_study(tmp_path / "full.yaml")
    evaluation = json.loads(full.read_text())["evaluation"] + ["--num_samples", "100", "--num_real", "100"]
    evaluation[1:1] = ["fid"]
    full = write_study(tmp_path / "full.yaml", evaluation=evaluation + ["--quantize", "8"])
    for kept in ("runs", "done"):
        shutil.copytree(out / kept, tmp_path / "full" / kept)
    monkeypatch.setattr(evaluate_flat, "InceptionFeatures", lambda dtype: PooledPixels())
    run_study.main(run_study.parse_args(["--study", str(full), "--output_dir", str(tmp_path / "full")]))
    report = (tmp_path / "full" / "report.md").read_text()
    for heading in ("## Quality (Table 2)", "FID (T'=2)", "KID x10³ (T'=4)", "## Flatness and exposure bias"):
        assert heading in report
    assert "## Quantization robustness (Table 4)" in report and "8-bit ΔFID (T'=2)" in report
    assert "8-bit pixels moved (T'=4)" in report and "8-bit Δloss" in report
    assert "## Claims" in report and "SAM loses less FID (T'=20) under 8-bit weights" in report
    for figure in ("perturbation.png", "exposure_bias.png"):
        assert (tmp_path / "full" / figure).stat().st_size > 1000
