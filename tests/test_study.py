"""The study runner: aggregation and verdicts against hand computations, sharding, bad study files, and a micro study
end to end (real trainings under accelerate, in-process evaluations) that survives being killed."""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import run_study
from conftest import REPO, TREE_MARKER, kill_tree, run_cli, run_command, use_pooled_inception
from helpers import tuning, write_study
from scipy import stats

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.measurements import Measurements, json_results
from diffusers_flat.studies.claims import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    detectable_effect,
    paired_interval,
    verdict,
)
from diffusers_flat.studies.config import Study, Tuning, Work, shard_of
from diffusers_flat.studies.directory import StudyDirectory
from diffusers_flat.studies.plan import StudyPlan
from diffusers_flat.studies.progress import StudyProgress
from diffusers_flat.studies.report import write_report
from diffusers_flat.studies.results import StudyResults

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


def test_the_detectable_effect_is_the_t_closed_form_and_has_about_80_percent_power():
    # With 2 degrees of freedom Student's t has a closed-form quantile: t_p = (2p - 1) / sqrt(2 p (1 - p)).
    t_975, t_80 = (0.95 / math.sqrt(2 * 0.975 * 0.025), 0.6 / math.sqrt(2 * 0.8 * 0.2))
    assert t_975 == pytest.approx(T_975_2)
    assert detectable_effect(sd=0.5, n=3) == pytest.approx((t_975 + t_80) * 0.5 / math.sqrt(3))
    a, b = [0.10, 0.12, 0.11], [0.07, 0.089, 0.081]
    interval = paired_interval(a, b)
    sd = float(np.std(np.subtract(b, a), ddof=1))
    assert interval["sd"] == pytest.approx(sd) and interval["detectable"] == pytest.approx(
        (t_975 + t_80) * sd / 3**0.5
    )
    assert math.isnan(detectable_effect(sd=1.0, n=1)) and math.isnan(paired_interval([0.1], [0.0])["detectable"])
    # what it means: a true effect of that size, with that spread, is found (interval excluding zero) about 80% of
    # the time. Simulated: 20,000 designs of 6 pairs.
    rng = np.random.default_rng(0)
    effect = detectable_effect(sd=1.0, n=6)
    differences = rng.normal(effect, 1.0, (20000, 6))
    half = stats.t.ppf(0.975, 5) * differences.std(axis=1, ddof=1) / math.sqrt(6)
    found = np.mean(np.abs(differences.mean(axis=1)) > half)
    assert 0.77 < found < 0.82


def test_tuning_selects_the_lowest_score_and_the_first_of_a_tie():
    tuning = Tuning("SAM", "--sam_rho", ("0.1", "0.01", "0.001"), 0, "kid", 20, "raw")
    assert tuning.select({"0.1": 0.030, "0.01": 0.012, "0.001": 0.020}) == "0.01"
    assert tuning.select({"0.1": 0.030, "0.01": 0.040, "0.001": 0.020}) == "0.001"  # the data move, the choice does
    assert tuning.select({"0.1": 0.02, "0.01": 0.03, "0.001": 0.02}) == "0.1"
    result = Measurements.from_json({"fid": {"20": 31.5, "100": 20.0}, "kid": {"20": {"mean": 0.017, "std": 0.002}}})
    assert tuning.score(result) == 0.017
    assert Tuning("SAM", "--sam_rho", ("0.1",), 0, "fid", 100, "ema").score(result) == 20.0
    assert tuning.tag("0.001") == "rho0.001"


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_partition_the_runs(count):
    tuning = Tuning("SAM", "--sam_rho", ("0.1", "0.01", "0.001"), 0, "kid", 20, "raw", baseline="ADM")
    methods = {"ADM": (), "IP": ("--input_perturbation", "0.1"), "SAM": ()}
    study = Study(REPO / "s.yaml", (1, 2, 3), methods, tuning=tuning)
    runs = study.tuning_runs() + study.runs()
    shards = [shard_of(runs, i, count) for i in range(1, count + 1)]
    assert sorted(r.name for s in shards for r in s) == sorted(r.name for r in runs)
    assert sum(len(s) for s in shards) == len(runs) == 4 + 9 == len({r.name for r in runs})


BAD = {
    "missing": (None, "--study {path}: no file"),
    "not yaml": ("seeds: [1, 2\n", "not valid YAML"),
    "unknown method": ({"methods": {"ADM": [], "LION": []}}, "unknown method LION; choose from ADM, IP, SAM"),
    "repeated seed": (
        {"seeds": [1, 2, 1]},
        "seeds must be a list of whole numbers >= 0, none repeated, got [1, 2, 1]",
    ),
    "unknown training flag": ({"training": ["--learnig_rate", "1"]}, "unrecognized arguments: --learnig_rate 1"),
    "unknown metric": ({"evaluation": ["--metrics", "sharpness"]}, "--metrics: unknown sharpness"),
    "bad shard": ({}, "--shard 5/4: I must be from 1 to N"),
    "tuning seed in the grid": (
        {"tuning": tuning(seed=1)},
        "tuning.seed must be a whole number >= 0 that is not one of the study's seeds, got 1",
    ),
    "tuned flag set twice": (
        {"methods": {"ADM": [], "SAM": ["--sam_rho", "0.1"]}},
        "tuning.flag --sam_rho is also set in the study's training or methods.SAM: set it in one place",
    ),
    "tuning of an unknown method": (
        {"tuning": tuning(method="IP")},
        "tuning.method must be one of the study's methods (ADM, SAM), got IP",
    ),
    "bad tuned value": ({"tuning": tuning(values=["0.1", "large"])}, "invalid float value: 'large'"),
    "selection not measured": (
        {"tuning": tuning(evaluation=["--metrics", "lpf", "--inference_steps", "2"])},
        "the tuning selects by kid at T'=2: its evaluation flags must measure fid with --inference_steps including 2",
    ),
    "fraction of an unknown method": (
        {"fraction_kept": {"of": "IP", "granularity": "per_channel", "bits": 3}},
        "fraction_kept.of must be a method of the study other than ADM, with ADM and at least one more method",
    ),
    "fraction at a level not measured": (
        {
            "methods": {"ADM": [], "SAM": [], "SAM-b": []},
            "fraction_kept": {"of": "SAM", "granularity": "per_channel", "bits": 3},
        },
        "fraction_kept: 3-bit per_channel must be a level of the evaluation's sensitivity ladder",
    ),
    "quantized column not sampled": (
        {
            "evaluation": [
                "--metrics",
                "fid",
                "--inference_steps",
                "2",
                "--quantize",
                "8",
                "--quantize_inference_steps",
                "4",
            ]
        },
        "--quantize_inference_steps must be among inference_steps [2], got [4]",
    ),
    "family without a primary endpoint": (
        {"family": [{"measure": "lpf", "base": "ADM", "treated": "SAM", "variant": "raw"}]},
        "family and exploratory claims need a primary endpoint: name one under primary",
    ),
    "unknown measure": (
        {"primary": {"measure": "fid_drop", "base": "ADM", "treated": "SAM", "variant": "raw"}},
        "primary.measure must be one of kid_increase, kid, class_fidelity, displacement, lpf, got fid_drop",
    ),
    "quantized measure without a level": (
        {"primary": {"measure": "kid_increase", "base": "ADM", "treated": "SAM", "variant": "raw"}},
        'primary.level: kid_increase is measured at a quantized level; name it, e.g. "4:per_channel"',
    ),
    "primary of two claims": (
        {
            "primary": {
                "measure": "kid_increase",
                "base": "ADM",
                "treated": "SAM",
                "variant": "raw",
                "level": ["5:per_channel", "4:per_channel"],
            }
        },
        "primary must be one claim: a single treated method and level",
    ),
    "claim of a variant not evaluated": (
        {
            "variants": ["raw"],
            "primary": {"measure": "lpf", "base": "ADM", "treated": "SAM", "variant": "ema"},
        },
        "primary.variant must be one of the study's variants (raw), got ema",
    ),
    "claim at a level not quantized": (
        {
            "primary": {
                "measure": "kid_increase",
                "base": "ADM",
                "treated": "SAM",
                "variant": "raw",
                "level": "4:per_channel",
            }
        },
        "primary: kid_increase of SAM (raw) at 4:per_channel: the raw evaluation must --quantize that level",
    ),
    "claim declared twice": (
        {
            "primary": {"measure": "lpf", "base": "ADM", "treated": "SAM", "variant": "raw"},
            "family": [{"measure": "lpf", "base": "ADM", "treated": "SAM", "variant": "raw"}],
        },
        "the claim lpf of SAM (raw) is declared twice",
    ),
    "figure of a seed not in the study": (
        {"figure": {"rows": ["ADM", "SAM"], "variant": "raw", "level": "4:per_channel", "seeds": [7]}},
        "figure.seeds must list seeds of the study (1, 2)",
    ),
    "variant evaluation of an unknown variant": (
        {"variants": ["raw"], "variant_evaluation": {"ema": ["--metrics", "fid"]}},
        "variant_evaluation must map variants of the study (raw) to flags",
    ),
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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--executor", "ray", "--shard", "2/3"],
            "--executor ray runs the whole study on the cluster: leave out --shard",
        ),
        (
            ["--executor", "ray", "--report_only"],
            "--executor ray runs the whole study on the cluster: leave out --shard",
        ),
        (["--ray_address", "auto"], "--ray_address names the cluster of --executor ray: add --executor ray"),
        (["--executor", "dask"], "argument --executor: invalid choice: 'dask' (choose from 'local', 'ray')"),
        (["--executor", "ray"], 'Ray is not installed; pip install -e ".[cluster]"'),
    ],
)
def test_a_bad_executor_is_one_line_and_writes_nothing(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as without the cluster extra: `import ray` fails
    path = write_study(tmp_path / "study.yaml", tuning=None)
    status, err = run_cli(run_study, ["--study", path, "--output_dir", tmp_path / "out", *flags], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status != 0 and len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_every_run_and_evaluation(tmp_path, capsys):
    path = write_study(tmp_path / "study.yaml", tuning=tuning(baseline="ADM"))
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(tmp_path / "out"), "--dry_run"]))
    printed = capsys.readouterr().out
    # tuning: rho 0.1 and 0.01 and the ADM baseline at seed 0, one evaluation each; the grid: 2 seeds x 2 methods
    assert "7 trainings and 15 evaluations (shard 1/1)" in printed and "(+SAM+SWA)" in printed
    assert "tune sam-rho0.01-seed0: " in printed and "--sam_rho 0.01 --use_ema --use_swa --seed 0 " in printed
    assert "tune adm-seed0: " in printed and "train sam-seed2: " in printed and "--sam_rho TUNED" in printed
    # steps: ADM at seed 0 and in the grid, 3 x 3; SAM at rho 0.1 and 0.01 and in the grid, 4 x 3.
    # The tuning's three evaluations sample 100 images of T' = 2: 200 forwards and 100 images each. The grid's twelve
    # (no FID) take 16 loss terms x (the fixed loss + 3 LPF draws + 3 gammas x 1 direction) and 2 x 4 exposure
    # chains x 4 steps: 144 forwards each. 3 x 200 + 12 x 144 = 2,328.
    assert (
        "work: 9 training steps and 12 SAM steps (two passes each); 2,328 UNet image-forwards of evaluation "
        "(sampling steps and loss terms) and 300 generated images through InceptionV3" in printed
    )
    assert "for hours on your device: python benchmarks/study_cost.py" in printed
    # with measured rates: 9 steps at 0.0025/s = 1 h, 12 SAM steps at 0.002/s = 1.67 h; 2,328 forwards at 2328/3600
    # per second = 1 h, 300 images at 300/3600 per second = 1 h
    rates = {"study": "study.yaml", "device": "a GPU", "plain_steps_per_s": 0.0025, "sam_steps_per_s": 0.002}
    rates |= {"unet_image_forwards_per_s": 2328 / 3600, "inception_images_per_s": 300 / 3600}
    (tmp_path / "rates.json").write_text(json.dumps(rates))
    argv = [
        "--study",
        str(path),
        "--output_dir",
        str(tmp_path / "out"),
        "--dry_run",
        "--rates",
        str(tmp_path / "rates.json"),
    ]
    run_study.main(run_study.parse_args(argv))
    printed = capsys.readouterr().out
    assert (
        "projected on a GPU: training 2.7 h (9 steps at 0.0025 /s, 12 SAM steps at 0.002 /s) + evaluation 2.0 h"
        in printed
    )
    assert printed.rstrip().endswith("= 4.7 h")
    assert not (tmp_path / "out").exists()


def test_the_progress_bar_counts_down_the_hours_of_the_unfinished_tasks(tmp_path):
    # the dry run's study and rates above: training 9 / 0.0025 + 12 / 0.002 = 3,600 + 6,000 s, evaluation 3,600 s of
    # forwards + 3,600 s of images: 16,800 s = 4.67 h
    path = write_study(tmp_path / "study.yaml", tuning=tuning(baseline="ADM"))
    rates = {"study": "study.yaml", "device": "a GPU", "plain_steps_per_s": 0.0025, "sam_steps_per_s": 0.002}
    rates |= {"unet_image_forwards_per_s": 2328 / 3600, "inception_images_per_s": 300 / 3600}
    plan = StudyPlan(Study.load(path), StudyDirectory(tmp_path / "out"))
    tasks = plan.tasks(1, 1)
    assert len(tasks) == 7 + 15
    with StudyProgress(plan, tasks, rates) as progress:
        assert progress.bar.postfix == "4.7 h left" and progress.bar.total == 22
        progress.done(tasks[0])  # tune sam-rho0.1-seed0: 3 SAM steps / 0.002 = 1,500 s
        assert progress.seconds_left == pytest.approx(16800 - 1500)
        progress.done(tasks[1])  # its evaluation: 200 forwards and 100 images at T'=2 = 309.28 + 1,200 s
        assert progress.seconds_left == pytest.approx(16800 - 1500 - 200 * 3600 / 2328 - 1200)
        assert progress.bar.postfix == "3.8 h left" and progress.bar.n == 2
        for task in tasks[2:]:
            progress.done(task)
        assert progress.seconds_left == pytest.approx(0, abs=1e-6) and progress.bar.postfix == "0.0 h left"
    with StudyProgress(plan, tasks, rates, parallel=2) as progress:  # two tasks at once: half the hours
        assert progress.bar.postfix == "2.3 h left"
    with StudyProgress(plan, tasks, None) as progress:  # without rates: tasks only
        assert not progress.bar.postfix


@pytest.mark.parametrize(
    "study, counts, work",
    [
        # tuning: rho 0.1, 0.01, 0.001 and ADM at seed 0; the grid: 3 seeds x (ADM, IP, SAM), 855 steps each.
        # Each grid pipeline: sampling 100 x (20 + 100) fp32 + 3 bits x 100 x 20 = 18,000 forwards and 500 images;
        # loss terms 128 x (fixed + 3 quantized + 50 LPF draws + 6 gammas x 3 directions) = 9,216; exposure bias
        # 2 x 64 chains x 100 steps = 12,800: 40,016 each, x 27 = 1,080,432; the tuning's 4 x 200 x 20 = 16,000.
        (
            "digits.yaml",
            "13 trainings and 31 evaluations",
            "work: 5,985 training steps and 5,130 SAM steps (two passes each); 1,096,432 UNet image-forwards of "
            "evaluation (sampling steps and loss terms) and 14,300 generated images",
        ),
        # 200K steps: ADM and IP x 3 seeds; SAM x (3 tuning + 3 seeds). Each grid pipeline: 50,000 x (20 + 100) x
        # (fp32 + 8 bits) = 12,000,000 forwards and 200,000 images; 256 loss terms x (2 + 100 LPF + 18 + 81 surface)
        # = 51,456; exposure 2 x 128 x 100 = 25,600: 12,077,056, x 27 = 326,080,512; tuning 3 x 50,000 x 20.
        (
            "paper-cifar10.yaml",
            "12 trainings and 30 evaluations",
            "work: 1,200,000 training steps and 1,200,000 SAM steps (two passes each); 329,080,512 UNet "
            "image-forwards of evaluation (sampling steps and loss terms) and 5,550,000 generated images",
        ),
        # No tuning; 6 seeds x (ADM, SAM rho 0.01, SAM rho 0.001), 1,500 steps, raw and EMA evaluated. Each
        # pipeline: sampling 500 x 20 at fp32 and at 5 bits = 20,000 forwards and 1,000 images; loss terms 128 x
        # (fixed + 5-bit + 50 LPF draws) = 6,656; exposure 2 x 64 x 20 = 2,560; the ladder (10 levels and fp32) x
        # (128 + 3 x 64 x 20: the DDIM pipeline, the PF-ODE and the DDPM pipeline) = 43,648: 72,864 each, x 36 =
        # 2,623,104.
        (
            "fashion-mnist.yaml",
            "18 trainings and 36 evaluations",
            "work: 9,000 training steps and 18,000 SAM steps (two passes each); 2,623,104 UNet image-forwards of "
            "evaluation (sampling steps and loss terms) and 36,000 generated images",
        ),
        # Tuning: the random mode at sigma 0.01, 0.003, 0.001 on seed 0 (200 images at T'=20 each); the grid: 5 seeds
        # x 7 rows less ADM and full SAM at seeds 2-5 (read from the Fashion-MNIST study's report) = 27 runs (ADM
        # plain; full SAM and the five modes counted as SAM steps, an upper bound for the cheap ones), 1,500 steps, raw
        # and EMA: 54 pipelines x 72,864 + 3 x 200 x 20 = 3,946,656 forwards, 54,000 + 600 images.
        (
            "fashion-mnist-cheap-sam.yaml",
            "30 trainings and 57 evaluations",
            "work: 1,500 training steps and 43,500 SAM steps (two passes each); 3,946,656 UNet image-forwards of "
            "evaluation (sampling steps and loss terms) and 54,600 generated images",
        ),
    ],
)
def test_the_shipped_studies_check_and_cost_what_a_hand_count_says(study, counts, work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # a study's recipe is relative to the checkout
    run_study.main(run_study.parse_args(["--study", f"studies/{study}", "--output_dir", str(tmp_path), "--dry_run"]))
    printed = capsys.readouterr().out
    assert f"{counts} (shard 1/1)" in printed and work in printed
    tuning = Study.load(REPO / "studies" / study).tuning
    if tuning is not None and tuning.method == "SAM":  # the paper's grid, on a seed of its own
        assert tuning.values == ("0.1", "0.01", "0.001") and tuning.seed == 0
    if tuning is not None and tuning.method == "SAM-random":  # around LPF's own sigma, on a seed of its own
        assert tuning.values == ("0.01", "0.003", "0.001") and tuning.seed == 0


def test_rates_of_another_study_are_refused(tmp_path, capsys):
    path = write_study(tmp_path / "study.yaml")
    (tmp_path / "rates.json").write_text(json.dumps({"study": "studies/digits.yaml"}))
    argv = ["--study", path, "--output_dir", tmp_path / "out", "--dry_run", "--rates", tmp_path / "rates.json"]
    status, err = run_cli(run_study, argv, capsys)
    assert (
        status != 0 and f"--rates {tmp_path / 'rates.json'}: measured for study studies/digits.yaml, not {path}" in err
    )


def test_rates_with_report_only_are_refused(tmp_path, capsys):
    path = write_study(tmp_path / "study.yaml")
    argv = ["--study", path, "--output_dir", tmp_path / "out", "--report_only", "--rates", tmp_path / "rates.json"]
    status, err = run_cli(run_study, argv, capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status != 0 and len(errors) == 1 and "--rates costs a --dry_run or a run" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_cost_benchmark_measures_rates_and_projects_the_study(tmp_path):
    path = write_study(tmp_path / "study.yaml")
    command = [sys.executable, str(REPO / "benchmarks" / "study_cost.py"), "--study", str(path), "--channels", "1"]
    result = run_command([*command, "--steps", "2", "--device", "cpu", "--output", str(tmp_path / "rates.json")])
    assert result.returncode == 0, result.stderr[-3000:]
    rates = json.loads((tmp_path / "rates.json").read_text())
    keys = ("plain_steps_per_s", "sam_steps_per_s", "unet_image_forwards_per_s", "inception_images_per_s")
    assert all(math.isfinite(rates[k]) and rates[k] > 0 for k in keys) and rates["device"] == "cpu"
    assert rates["sam_steps_per_s"] < rates["plain_steps_per_s"]  # two passes cost more than one
    # the micro study without a baseline: ADM 2 x 3 steps, SAM 4 x 3; 2 x 200 + 12 x 144 forwards, 200 images
    assert Work(6, 12, 2128, 200).projection(rates) in result.stdout


def reuse_pair(tmp_path, other: dict | None = None, this: dict | None = None, seeds_reported=("1", "2", "3")):
    """Two micro studies of seeds 1-3 (ADM and SAM, raw pipelines): "other.yaml" with a report.json of made-up
    results, and "this.yaml", which reuses other's ADM runs of seeds 2 and 3."""
    base = {"seeds": [1, 2, 3], "tuning": None, "variants": ["raw"]}
    other_path = write_study(tmp_path / "other.yaml", **{**base, **(other or {})})
    results = {"ADM": {s: {"loss": 0.04 + int(s) / 1000, "lpf": {"lpf": 0.06 + int(s) / 100}} for s in seeds_reported}}
    report = {"settings": {"study": str(other_path), "evaluation": json.loads(other_path.read_text())["evaluation"]}}
    (tmp_path / "report.json").write_text(json.dumps({**report, "results": results}))
    reuse = {"study": str(other_path), "report": str(tmp_path / "report.json"), "runs": {"ADM": [2, 3]}}
    return write_study(tmp_path / "this.yaml", **{**base, "reuse": reuse, **(this or {})}), results


def test_reused_runs_are_read_from_the_other_studys_report_and_never_trained(tmp_path, capsys):
    path, reported = reuse_pair(tmp_path)
    study = Study.load(path)
    assert [run.name for run in study.to_train()] == ["adm-seed1", "sam-seed1", "sam-seed2", "sam-seed3"]
    assert len(study.runs()) == 6
    shards = [{run.name for run in shard_of(study.to_train(), i, 2)} for i in (1, 2)]
    assert shards == [{"adm-seed1", "sam-seed2"}, {"sam-seed1", "sam-seed3"}]
    results = StudyResults(StudyPlan(study, StudyDirectory(tmp_path / "out")))
    # nothing trained here yet: the grid holds only the reused runs, read from the report
    assert json_results(results.collect()) == {"ADM": {2: reported["ADM"]["2"], 3: reported["ADM"]["3"]}}
    record = results.settings_record()["reuse"]
    assert record["runs"] == {"ADM": (2, 3)}
    assert record["reproduction"] == [{"row": "ADM", "seed": 1, "here": None, "there": reported["ADM"]["1"]}]
    markdown = write_report(results.collect(), results.settings_record(), tmp_path / "report")
    # the check row: seed 1 not yet trained here; there loss 0.04 + 1/1000 and LPF 0.06 + 1/100, no FID measured
    assert "| ADM | 1 | not finished | 0.041 | not finished | 0.07 | not finished | - |" in markdown
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(tmp_path / "out"), "--dry_run"]))
    printed = capsys.readouterr().out
    assert "4 trainings and 4 evaluations (shard 1/1)" in printed and "train adm-seed2" not in printed
    assert f"reused from {tmp_path / 'report.json'} (not trained): ADM seeds 2, 3" in printed


REUSE_BAD = {
    "first seed": ({}, {"reuse": "first seed"}, "reuse.runs.ADM: seed 1 is the first seed, trained here"),
    "other flags": (
        {"methods": {"ADM": ["--learning_rate", "0.001"], "SAM": []}},
        {},
        "reuse.runs.ADM: {other} trains seed 2 with other flags than this study",
    ),
    "other evaluation": (
        {"evaluation": ["--metrics", "lpf", "--lpf_draws", "2"]},
        {},
        "reuse.study {other} evaluates with other flags",
    ),
    "tuned here": ({}, {"tuning": tuning(method="ADM", flag="--learning_rate", values=["0.001"])}, "takes the value"),
    "not in the report": ({}, {"reported": ("1", "2")}, "reuse.report {report} has no result of row ADM at seed 3"),
}


@pytest.mark.parametrize("case", list(REUSE_BAD))
def test_a_bad_reuse_is_one_line_naming_the_key(case, tmp_path, capsys):
    other, this, message = REUSE_BAD[case]
    reported = this.pop("reported", ("1", "2", "3"))
    path, _ = reuse_pair(tmp_path, other, {k: v for k, v in this.items() if k != "reuse"}, reported)
    if this.get("reuse") == "first seed":
        study = json.loads(path.read_text())
        study["reuse"]["runs"] = {"ADM": [1, 2]}
        path.write_text(json.dumps(study))
    status, err = run_cli(run_study, ["--study", path, "--output_dir", tmp_path / "out"], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    expected = message.format(other=tmp_path / "other.yaml", report=tmp_path / "report.json")
    assert status != 0 and len(errors) == 1 and expected in errors[0], err
    assert not (tmp_path / "out").exists()


def test_a_shard_whose_tuned_runs_wait_for_another_shards_tuning_says_so(tmp_path, capsys):
    # runs: sam-rho0.1-seed0, sam-rho0.01-seed0, adm-seed1, sam-seed1, adm-seed2, sam-seed2; shard 4/6: sam-seed1
    path = write_study(tmp_path / "study.yaml")
    status, err = run_cli(run_study, ["--study", path, "--output_dir", tmp_path / "out", "--shard", "4/6"], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status != 0 and len(errors) == 1, err
    assert "--shard 4/6: the SAM runs take the tuned --sam_rho, and the tuning runs of other shards" in errors[0]
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.slow
def test_a_micro_study_survives_a_kill_and_reports_every_table(tmp_path, monkeypatch):
    path = write_study(tmp_path / "study.yaml")
    out = tmp_path / "out"
    # Killed while training the grid's second run: by then rho is tuned (two trainings, each evaluated with the real
    # InceptionV3), and the grid's first run and its three evaluations are finished.
    marker = "study-kill-test"
    command = [sys.executable, str(REPO / "training_scripts" / "run_study.py"), "--study", str(path)]
    process = subprocess.Popen(
        [*command, "--output_dir", str(out)], env={**os.environ, TREE_MARKER: marker}, cwd=REPO, start_new_session=True
    )
    second_log = out / "logs" / "sam-seed1.log"
    deadline = time.monotonic() + 400
    while not second_log.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_tree(marker)
    process.wait(timeout=30)
    assert second_log.exists(), "the study never reached the grid's second training"
    tuned_evaluations = [out / "eval" / f"sam-rho{rho}-seed0-raw" / "eval_results.json" for rho in ("0.1", "0.01")]
    done = [*(out / "eval").glob("adm-seed1-*/eval_results.json"), out / "runs" / "adm-seed1" / "model_index.json"]
    done += [*tuned_evaluations, out / "runs" / "sam-rho0.01-seed0" / "model_index.json"]
    finished = {p: p.stat().st_mtime_ns for p in done}
    assert len(finished) == 7 and (out / "done" / "adm-seed1").exists()

    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(out)]))
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # neither retrained nor evaluated again
    # the grid's SAM runs were trained with the rho of the lower KID at T'=2, read here from the tuning's results
    kids = {
        rho: next(iter(json.loads(p.read_text()).values()))["kid"]["2"]["mean"]
        for rho, p in zip(("0.1", "0.01"), tuned_evaluations)
    }
    selected = min(kids, key=kids.get)
    for seed in (1, 2):
        trained_with = json.loads((out / "runs" / f"sam-seed{seed}" / "training_args.json").read_text())
        assert trained_with["sam_rho"] == float(selected)
    data = json.loads((out / "report.json").read_text())
    assert data["settings"]["tuning"]["selected"] == selected
    assert [row["selected"] for row in data["tuning"]] == [rho == selected for rho in ("0.1", "0.01")]
    assert f"the grid's SAM runs use --sam_rho **{selected}**" in (out / "report.md").read_text()
    assert set(data["results"]) == {"ADM", "+EMA", "+SWA", "+SAM", "+SAM+EMA", "+SAM+SWA"}
    lpf_claim = next(c for c in data["claims"] if c["claim"] == "SAM lowers LPF relative to ADM")
    adm = [data["results"]["ADM"][s]["lpf"]["lpf"] for s in ("1", "2")]
    sam = [data["results"]["+SAM"][s]["lpf"]["lpf"] for s in ("1", "2")]
    assert lpf_claim["interval"]["mean"] == pytest.approx(np.mean(np.subtract(sam, adm)))
    assert lpf_claim["interval"]["n"] == 2 and lpf_claim["verdict"] in (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)

    # A changed study does not reuse runs trained with other flags: one line, nothing retrained.
    training = json.loads(path.read_text())["training"] + ["--learning_rate", "2e-4"]
    changed = write_study(tmp_path / "changed.yaml", training=training)
    with pytest.raises(FlatError, match=r"sam-rho0.1-seed0 was trained with other flags than the study's now"):
        run_study.main(run_study.parse_args(["--study", str(changed), "--output_dir", str(out)]))
    assert {p: p.stat().st_mtime_ns for p in finished} == finished

    # The same trainings evaluated with FID, KID and 8-bit weights at T'=2 too (a pooled-pixel stand-in for
    # InceptionV3; the tuning's evaluations are kept, so the same rho is selected): every table of the report.
    full = write_study(tmp_path / "full.yaml")
    evaluation = json.loads(full.read_text())["evaluation"] + ["--num_samples", "100", "--num_real", "100"]
    evaluation[1:1] = ["fid"]
    quantized = ["--quantize", "8", "--quantize_inference_steps", "2"]
    full = write_study(tmp_path / "full.yaml", evaluation=evaluation + quantized)
    for kept in ("runs", "done"):
        shutil.copytree(out / kept, tmp_path / "full" / kept)
    for rho in ("0.1", "0.01"):
        shutil.copytree(
            out / "eval" / f"sam-rho{rho}-seed0-raw", tmp_path / "full" / "eval" / f"sam-rho{rho}-seed0-raw"
        )
    use_pooled_inception(monkeypatch)
    run_study.main(run_study.parse_args(["--study", str(full), "--output_dir", str(tmp_path / "full")]))
    report = (tmp_path / "full" / "report.md").read_text()
    for heading in ("## Tuning of --sam_rho", "## Quality (Table 2)", "FID (T'=2)", "KID x10³ (T'=4)"):
        assert heading in report
    assert "## Flatness and exposure bias" in report and "## Quantization robustness (Table 4)" in report
    assert "8-bit ΔFID (T'=2)" in report and "8-bit pixels moved (T'=2)" in report and "8-bit Δloss" in report
    assert "8-bit ΔFID (T'=4)" not in report  # quantized weights sampled at T'=2 only, as asked
    assert "## Claims" in report and "SAM loses less FID (T'=20) under 8-bit weights" in report
    for figure in ("perturbation.png", "exposure_bias.png"):
        assert (tmp_path / "full" / figure).stat().st_size > 1000


def test_the_deployment_studys_plan_is_its_runs_and_evaluations_in_file_order(tmp_path):
    """The plan alone, nothing run: 24 one-run shards in the file's order (seed by seed), each a training, then its
    raw pipeline evaluated with the raw variant's own flags and its EMA pipeline with the study's."""
    study = Study.load(REPO / "studies" / "fashion-mnist-deployment.yaml")
    plan = StudyPlan(study, StudyDirectory(tmp_path / "out"))
    rows = ["adm", "sam-rho0.01", "sam-momentum"]
    names = [f"{row}-seed{seed}" for seed in range(1, 9) for row in rows]  # counted by hand from the file
    for k, name in enumerate(names, start=1):
        assert plan.tuning_tasks(k, 24) == []
        tasks, waiting = plan.grid_tasks(k, 24, tuned=None)
        assert waiting == [] and [(t.kind, t.run.name, t.variant) for t in tasks] == [
            ("train", name, None),
            ("evaluate", name, "raw"),
            ("evaluate", name, "ema"),
        ]
        raw, ema = tasks[1].plan, tasks[2].plan
        assert raw.flags == study.variant_evaluation["raw"] and ema.flags == study.evaluation
    assert raw.settings.quantize == ("4:per_channel",) and len(ema.settings.quantize) == 3
    everything, _ = plan.grid_tasks(1, 1, tuned=None)
    assert len(everything) == 24 * 3 and not list(tmp_path.iterdir())  # and the plan wrote nothing
