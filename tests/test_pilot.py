"""The training-length pilot: its rule against hand computations, its file's checks, and a micro pilot end to end
whose stages are points of one run (the last stage's weights equal a straight run's)."""

import json

import pytest
import run_pilot
import torch
import yaml
from conftest import REPO, micro_args, run_cli, train_here
from safetensors.torch import load_file

from diffusers_flat.studies.pilot import Pilot

PILOT = Pilot(
    REPO / "p.yaml", 1, (), (1500, 3000, 6000), "ema", (), 0.15, 8.0, 8, {"SAM": 2.0, "MSAM": 1.0}, {"ema": 4}
)


def test_the_rule_picks_the_shortest_length_within_its_tolerance_of_the_longest():
    # the longest's KID 20: the threshold is 23
    assert PILOT.pick({1500: 30.0, 3000: 23.0, 6000: 20.0}) == 3000
    assert PILOT.pick({1500: 22.9, 3000: 30.0, 6000: 20.0}) == 1500  # the shortest, even if a longer one is worse
    assert PILOT.pick({1500: 30.0, 3000: 23.1, 6000: 20.0}) == 6000


def test_the_projection_is_seeds_times_rows_by_hand():
    # training: 8 seeds x 3000 steps x (1 + 2 + 1) plain steps / 4 per second = 24,000 s; evaluation: 8 seeds x 3
    # rows x 4 sets x 300 s = 28,800 s
    hours = PILOT.projection(3000, steps_per_second=4.0, seconds_per_set=300.0)
    assert hours == pytest.approx({"training": 24000 / 3600, "evaluation": 28800 / 3600, "total": 52800 / 3600})


@pytest.mark.parametrize(
    ("seconds_per_set", "kid", "length", "reason"),
    [
        # 10 s a set: evaluation 0.27 h; totals 3.6, 6.9, 13.6 h
        (10.0, {1500: 30.0, 3000: 22.0, 6000: 20.0}, 3000, "L* fits"),
        (10.0, {1500: 30.0, 3000: 25.0, 6000: 20.0}, 3000, "the longest length that does"),
        # 100 s a set: evaluation 2.67 h; totals 6.0, 9.3, 16 h
        (100.0, {1500: 30.0, 3000: 25.0, 6000: 20.0}, 1500, "the longest length that does"),
        # 2000 s a set: the evaluation alone is 53 h, so the budget applies to the training
        (2000.0, {1500: 30.0, 3000: 25.0, 6000: 20.0}, 3000, "the longest length whose training fits"),
        (2000.0, {1500: 30.0, 3000: 22.0, 6000: 20.0}, 3000, "which fits at L*"),
    ],
)
def test_the_study_takes_l_star_unless_the_budget_says_otherwise(seconds_per_set, kid, length, reason):
    # plain 4 steps/s: training 8 x L x 4 / 4 / 3600 h = L / 450 h (3.3 h at 1500, 6.7 at 3000, 13.3 at 6000)
    decision = PILOT.decide(kid, steps_per_second=4.0, seconds_per_set=seconds_per_set)
    assert decision["length"] == length and reason in decision["reason"]


BAD = {
    "lengths out of order": ({"lengths": [3000, 1500]}, "lengths must be two or more increasing whole numbers"),
    "a stage not on a checkpoint": (
        {"lengths": [1500, 2000]},
        "training's --checkpointing_steps must divide every length",
    ),
    "the pilot's own flag": ({"training": ["--seed", "3"]}, "training sets --seed: the pilot sets it"),
    "no KID": ({"evaluation": ["--metrics", "lpf"]}, "evaluation must measure fid"),
    "a schedule that depends on the total": (
        {"training": ["--lr_scheduler", "cosine", "--checkpointing_steps", "1500"]},
        "training's --lr_scheduler must be constant or constant_with_warmup",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_pilot_file_is_one_line_naming_it(case, tmp_path, capsys):
    data = yaml.safe_load((REPO / "studies" / "fashion-mnist-deployment-pilot.yaml").read_text())
    change, message = BAD[case]
    path = tmp_path / "pilot.yaml"
    path.write_text(json.dumps(data | change))
    status, err = run_cli(run_pilot, ["--pilot", path, "--output_dir", tmp_path / "out"], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status != 0 and len(errors) == 1 and message in errors[0] and "--pilot" in errors[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_micro_pilot_is_one_run_stopped_at_each_length(tmp_path, micro_unet_config, pooled_inception):
    constant = ("--lr_scheduler", "constant_with_warmup")
    training = micro_args(tmp_path / "unused", micro_unet_config, "--use_ema", "--checkpointing_steps", "2", *constant)
    training = training[2:]  # the pilot sets --output_dir
    pilot = {
        "seed": 1,
        "training": training,
        "lengths": [2, 4],
        "variant": "ema",
        "evaluation": ["--metrics", "fid", "--sampler", "ddim", "--inference_steps", "2", "--num_samples", "100"]
        + ["--num_real", "100"],
        "within": 0.15,
        "budget_hours": 8,
        "seeds": 8,
        "step_ratios": {"SAM": 2.0},
        "evaluation_sets": {"ema": 4, "raw": 2},
    }
    path = tmp_path / "pilot.yaml"
    path.write_text(json.dumps(pilot))
    out = tmp_path / "out"
    run_pilot.main(run_pilot.parse_args(["--pilot", str(path), "--output_dir", str(out)]))
    record = json.loads((out / "pilot.json").read_text())
    # the second stage resumed the first from its checkpoint: two steps each
    assert [record["stages"][s]["steps_trained"] for s in ("2", "4")] == [2, 2]
    for stage in ("2", "4"):
        result = json.loads((out / f"eval-{stage}" / "eval_results.json").read_text())
        (evaluated,) = result.values()
        assert record["stages"][stage]["kid"] == evaluated["kid"]["2"]["mean"]
    # one run: the stages' end equals four steps trained at once, EMA weights included
    straight = tmp_path / "straight"
    train_here(
        *micro_args(straight, micro_unet_config, "--use_ema", *constant, "--seed", "1", "--max_train_steps", "4")
    )
    for sub in ("unet", "ema/unet"):
        ours = load_file(out / "run" / sub / "diffusion_pytorch_model.safetensors")
        theirs = load_file(straight / sub / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), sub
    decision = record["decision"]
    kid = {int(s): stage["kid"] for s, stage in record["stages"].items()}
    assert decision["L*"] == (2 if kid[2] <= 1.15 * kid[4] else 4)
    report = (out / "report.md").read_text()
    assert f"L* = **{decision['L*']}** steps" in report and (out / "kid_by_length.png").stat().st_size > 5_000
    # run again: nothing is trained again
    log = (out / "training.log").read_text()
    run_pilot.main(run_pilot.parse_args(["--pilot", str(path), "--output_dir", str(out)]))
    assert (out / "training.log").read_text() == log
