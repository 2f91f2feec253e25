"""Training-set size as a study axis: nested subsets, the noise-unconditional UNet, the generalization study's
files, claims and report against hand computations, and a micro study end to end."""

import json

import numpy as np
import pytest
import run_study
import torch
from conftest import REPO, run_cli
from diffusers import DDPMPipeline, UNet2DModel
from helpers import tuning, write_study
from scipy import stats

from diffusers_flat.data.images import DataError, subset_indices
from diffusers_flat.studies.claims import paired_interval
from diffusers_flat.studies.config import Study
from diffusers_flat.studies.generalization_report import generalization_claims, write_generalization_report
from diffusers_flat.training.models import build_unet, make_noise_unconditional

STUDENT_EVALUATION = ["--metrics", "fid", "memorization", "pfd", "--pfd_reference", "empirical", "--pfd_noises", "4"]
STUDENT_EVALUATION += ["--pfd_steps", "2", "--inference_steps", "2", "--num_samples", "100", "--num_real", "100"]


def generalization(**changes) -> dict:
    """The micro generalization study: subsets of 16 and 64 digits, a 4-step ADM teacher at seed 0, the empirical
    denoiser of the 16 at T = 1 and 10^4 and its noise-unconditional variant."""
    return {
        "subsets": [16, 64],
        "teacher": {"method": "ADM", "seed": 0},
        "teacher_training": ["--max_train_steps", "4"],
        "teacher_evaluation": ["--metrics", "pfd", "--pfd_noises", "4", "--pfd_steps", "2"],
        "empirical_subset": 16,
        "temperatures": [1, 10000],
        "empirical_evaluation": ["--metrics", "fid", "memorization", "--inference_steps", "2", "--num_samples", "100"]
        + ["--num_real", "100"],
        "noise_unconditional": True,
    } | changes


def write_generalization_study(path, **changes):
    return write_study(
        path,
        methods={"ADM": [], "SAM": ["--sam_rho", "0.05"]},
        variants=["raw"],
        evaluation=STUDENT_EVALUATION,
        tuning=None,
        generalization=generalization(**changes),
    )


def test_subsets_are_nested_distinct_and_in_dataset_order():
    small, large, other = subset_indices(1797, 32), subset_indices(1797, 128), subset_indices(1797, 32, seed=1)
    assert len(set(small)) == 32 and len(set(large)) == 128 and set(small) < set(large)
    assert list(small) == sorted(small) and large.max() < 1797 and set(small) != set(other)
    assert sorted(subset_indices(10, 10)) == list(range(10))
    for size in (1, 11):
        with pytest.raises(DataError, match=f"train_subset must be from 2 to the dataset's 10 images, got {size}"):
            subset_indices(10, size)


def test_a_noise_unconditional_unet_ignores_the_timestep_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    unet = make_noise_unconditional(build_unet("tiny", 8, 1))
    assert not unet.time_embedding.linear_1.weight.requires_grad
    x = torch.randn(2, 1, 8, 8)
    before = unet(x, 10).sample.detach()
    # its time embedding's biases still train; the weights that would read t get no gradient
    loss = unet(x, 500).sample.square().mean()
    loss.backward()
    assert unet.time_embedding.linear_1.weight.grad is None and unet.time_embedding.linear_1.bias.grad is not None
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet")
    with torch.no_grad():
        outputs = [loaded(x, t).sample for t in (0, 10, 500, 999)]
    assert all(torch.equal(outputs[0], o) for o in outputs) and torch.allclose(outputs[1], before, atol=1e-6)
    # a UNet with its time input varies with t, as a check that the test can fail
    plain = build_unet("tiny", 8, 1)
    with torch.no_grad():
        assert not torch.equal(plain(x, 0).sample, plain(x, 999).sample)


def test_a_generalization_study_lists_its_runs(tmp_path):
    study = Study.load(write_generalization_study(tmp_path / "study.yaml"))
    names = [run.name for run in study.teacher_runs() + study.runs()]
    assert names == ["adm-teacher-seed0", "adm-nu-n16-seed0"] + [
        f"{m}-n{n}-seed{s}" for s in (1, 2) for n in (16, 64) for m in ("adm", "sam")
    ]
    teacher, unconditional, first = study.teacher_runs() + study.runs()[:1]
    assert "--train_subset" not in teacher.flags and teacher.flags[-4:] == ("--max_train_steps", "4", "--seed", "0")
    assert unconditional.flags[-5:-2] == ("--noise_unconditional", "--train_subset", "16")
    assert "--use_ema" not in first.flags and "--use_swa" not in first.flags  # raw weights only: no averages


BAD = {
    "subset above the dataset": (
        {"subsets": [16, 5000]},
        "generalization.subsets: --train_subset must be from 2 to the dataset's 1797 images, got 5000",
    ),
    "repeated subset": (
        {"subsets": [16, 64, 16]},
        "generalization.subsets must be a list of training-set sizes, whole numbers >= 2, none repeated, got [16, 64, "
        "16]",
    ),
    "subset of one": ({"subsets": [1, 64]}, "generalization.subsets must be a list of training-set sizes"),
    "teacher seed in the grid": (
        {"teacher": {"method": "ADM", "seed": 1}},
        "generalization.teacher.seed must be a whole number >= 0 that is not one of the study's seeds, got 1",
    ),
    "teacher of an unknown method": ({"teacher": {"method": "IP", "seed": 0}}, "generalization.teacher must be"),
    "E_gen without pfd": (
        {"teacher_evaluation": ["--metrics", "fid"]},
        "generalization.teacher_evaluation must measure pfd and leave --pfd_reference to the runner",
    ),
    "empirical subset not a subset": ({"empirical_subset": 32}, "generalization.empirical_subset must be one of"),
    "with a tuning": (
        {"teacher": {"method": "ADM", "seed": 0}, "tuning": True},
        "tuning and generalization cannot be combined; tune in a study of its own",
    ),
    "zero temperature": ({"temperatures": [1, 0]}, "generalization.temperatures must be a list of numbers > 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_generalization_study_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    changes, message = BAD[case]
    path = write_generalization_study(tmp_path / "study.yaml", **{k: v for k, v in changes.items() if k != "tuning"})
    if "tuning" in changes:  # the flatness study's micro tuning beside the generalization block
        study = json.loads(path.read_text()) | {"tuning": tuning(), "methods": {"ADM": [], "SAM": []}}
        path = write_study(path, **study)
    status, err = run_cli(run_study, ["--study", path, "--output_dir", tmp_path / "out"], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status != 0 and len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "out").exists()


def test_subsets_set_in_the_training_flags_are_refused(tmp_path, capsys):
    path = write_generalization_study(tmp_path / "study.yaml")
    data = json.loads(path.read_text())
    data["training"] += ["--train_subset", "16"]
    path.write_text(json.dumps(data))
    status, err = run_cli(run_study, ["--study", path, "--output_dir", tmp_path / "out"], capsys)
    assert status != 0 and "generalization.subsets set --train_subset: leave it out of training and methods" in err


def fake_result(e_gen: float, e_mem: float, memorized: float, kid: float = 0.01) -> dict:
    return {
        "pfd_teacher": {"pfd": e_gen},
        "pfd": {"pfd": e_mem},
        "memorization": {"memorization_ratio": memorized},
        "kid": {"20": {"mean": kid}},
        "fid": {"20": 30.0},
    }


def test_claims_are_paired_over_seeds_at_each_size(tmp_path):
    adm = {16: {1: fake_result(3.0, 1.0, 0.5, kid=0.02), 2: fake_result(4.0, 1.5, 0.7, kid=0.03)}}
    adm[16][3] = fake_result(3.5, 1.2, 0.6)
    sam = {16: {1: fake_result(2.0, 1.1, 0.4, kid=0.03), 2: fake_result(3.1, 1.4, 0.6), 3: fake_result(2.6, 1.3, 0.5)}}
    sam[64] = {1: fake_result(1.0, 2.0, 0.0)}  # no ADM at 64: no claim there
    students = {"ADM": adm, "+SAM": sam}
    settings = {"comparisons": [["ADM", "+SAM"]], "generalization": {"subsets": [16, 64]}}
    collected = {"students": students, "teacher": None, "noise_unconditional": None, "empirical": []}
    markdown = write_generalization_report(collected, settings, tmp_path)
    claims = json.loads((tmp_path / "report.json").read_text())["claims"]
    e_gen = next(c for c in claims if "lower E_gen" in c["claim"])
    # by hand: differences -1.0, -0.9, -0.9; mean -0.9333, s = 0.0577, t_{0.975, 2} = 4.3027
    half = 4.302652729911275 * np.std([-1.0, -0.9, -0.9], ddof=1) / np.sqrt(3)
    assert e_gen["interval"]["mean"] == pytest.approx(-2.8 / 3) and e_gen["training_images"] == 16
    assert e_gen["interval"]["high"] == pytest.approx(-2.8 / 3 + half) and e_gen["verdict"] == "holds"
    memorization = next(c for c in claims if "memorize less" in c["claim"])
    assert memorization["interval"]["mean"] == pytest.approx(-0.1) and memorization["verdict"] == "holds"
    # KID x10³, lower is better: differences +10, -20, 0; mean -10/3, s = 15.275
    kid = next(c for c in claims if "lower KID" in c["claim"])
    assert kid["claim"] == "+SAM students' samples are closer to the held-out data (lower KID x10³ (T'=20))"
    assert kid["interval"]["mean"] == pytest.approx(-10 / 3) and kid["expected_sign"] == -1
    assert kid["interval"]["high"] == pytest.approx(-10 / 3 + 4.302652729911275 * 15.275252316519467 / np.sqrt(3))
    assert kid["verdict"] == "inconclusive"
    assert [c["training_images"] for c in claims] == [16, 16, 16, 16]
    assert "| claim | rows |" in markdown and "None: no two rows" not in markdown
    # one family of the four, corrected by Holm: memorization's differences are all -0.1 (p = 0, first), then E_gen's
    # p (second, times 3), by hand from the paired t-tests
    p = [stats.ttest_rel(b, a).pvalue for a, b in (([3.0, 4.0, 3.5], [2.0, 3.1, 2.6]), ([20, 30, 10], [30, 10, 10]))]
    assert e_gen["p"] == pytest.approx(p[0]) and e_gen["p_holm"] == pytest.approx(3 * p[0])
    assert kid["p"] == pytest.approx(p[1]) and "**Hypotheses tested: 4.**" in markdown
    assert "| +SAM | 64 | 1 (n=1) |" in markdown and (tmp_path / "generalization.png").stat().st_size > 0
    # the same intervals as paired_interval of the values by hand
    assert generalization_claims(
        students,
        [("ADM", "+SAM")],
        {"E_gen": lambda r: r["pfd_teacher"]["pfd"]}
        | {"memorization": lambda r: r["memorization"]["memorization_ratio"], "E_mem": lambda r: r["pfd"]["pfd"]},
    )[2]["interval"] == paired_interval([1.0, 1.5, 1.2], [1.1, 1.4, 1.3])


def test_a_sweep_of_one_seed_per_row_states_it_tests_no_claim(tmp_path):
    students = {"ADM-2k": {32: {1: fake_result(3.0, 1.0, 0.5)}}, "+ADM-8k": {32: {1: fake_result(2.0, 1.1, 0.9)}}}
    settings = {"comparisons": [["ADM-2k", "+ADM-8k"]], "generalization": {"subsets": [32]}}
    settings["evaluation"] = ["--metrics", "pfd", "--pfd_reference", "smoothed"]
    collected = {"students": students, "teacher": fake_result(0.0, 0.7, 0.0), "noise_unconditional": None}
    markdown = write_generalization_report(collected | {"empirical": []}, settings, tmp_path)
    assert "The teacher: E_mem 0.7, memorization 0" in markdown
    assert "(E_mem against the smoothed empirical score of all the data)" in markdown
    claims_section = markdown.split("## Claims")[1]
    assert "None: no two rows share two or more seeds" in claims_section and "| claim |" not in claims_section
    assert json.loads((tmp_path / "report.json").read_text())["claims"] == []  # report.json lists none either
    assert "| +ADM-8k | 32 | 2 (n=1) | 1.1 (n=1) | 0.9 (n=1) |" in markdown  # the figures stay in the table


@pytest.mark.slow
def test_a_micro_generalization_study_end_to_end(tmp_path, pooled_inception):
    # one subset size (6 trainings, not 10): several sizes are covered by the plan's and the report's tests above
    size = 16
    path = write_generalization_study(tmp_path / "study.yaml", subsets=[size])
    out = tmp_path / "out"
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(out)]))
    data = json.loads((out / "report.json").read_text())
    students = data["students"]
    assert set(students) == {"ADM", "+SAM"} and all(set(s) == {str(size)} for s in students.values())
    for method, row in (("adm", "ADM"), ("sam", "+SAM")):
        for seed in (1, 2):
            record = json.loads((out / "runs" / f"{method}-n{size}-seed{seed}" / "training_args.json").read_text())
            assert record["train_subset"] == record["dataset_size"] == size
            result = students[row][str(size)][str(seed)]
            # memorization is counted against the student's own subset; KID against 100 of all the digits
            assert result["memorization"]["num_training"] == size and result["fid_num_real"] == 100
            teacher_eval = out / "eval" / f"{method}-n{size}-seed{seed}-raw-teacher" / "eval_results.json"
            against_teacher = next(iter(json.loads(teacher_eval.read_text()).values()))
            assert result["pfd_teacher"] == against_teacher["pfd"]
            assert against_teacher["pfd_reference"] == str(out / "runs" / "adm-teacher-seed0")
            assert result["pfd_reference"] == "empirical" and result["pfd"]["pfd"] > 0
    teacher_record = json.loads((out / "runs" / "adm-teacher-seed0" / "training_args.json").read_text())
    assert teacher_record["dataset_size"] == 1797 and teacher_record["max_train_steps"] == 4

    # the claim: E_gen of +SAM minus ADM, paired by seed, read back from the evaluations by hand
    claim = next(c for c in data["claims"] if "lower E_gen" in c["claim"] and str(c["training_images"]) == str(size))
    differences = [
        students["+SAM"][str(size)][s]["pfd_teacher"]["pfd"] - students["ADM"][str(size)][s]["pfd_teacher"]["pfd"]
        for s in ("1", "2")
    ]
    assert claim["interval"]["mean"] == pytest.approx(np.mean(differences)) and claim["interval"]["n"] == 2

    # the noise-unconditional student: blind to t in plain diffusers, compared with the noise-unconditional
    # empirical denoiser of the same 16 images
    unconditional = DDPMPipeline.from_pretrained(out / "runs" / "adm-nu-n16-seed0").unet
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(unconditional(x, 3).sample, unconditional(x, 997).sample)
    assert data["noise_unconditional"]["memorization"]["num_training"] == 16

    # the empirical denoiser at T = 1 reproduces its training images; at T = 10^4 it does not
    sweep = {(r["temperature"], r["noise_unconditional"]): r for r in data["empirical"]}
    assert set(sweep) == {(1.0, False), (10000.0, False), (1.0, True)}
    assert sweep[1.0, False]["memorization"]["memorization_ratio"] == 1.0
    assert sweep[10000.0, False]["memorization"]["memorization_ratio"] < 0.5
    report = (out / "report.md").read_text()
    for heading in ("## Students", "## Claims", "## The empirical denoiser of 16 training images", "## Noise unc"):
        assert heading in report
    for figure in ("generalization.png", "temperature.png"):
        assert (out / figure).stat().st_size > 0

    # run again: everything is found finished, nothing is trained or evaluated again
    finished = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("*/eval_results.json")}
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(out)]))
    assert {p: p.stat().st_mtime_ns for p in finished} == finished and len(finished) == 2 * 4 + 2 + 3 + 1


@pytest.mark.parametrize(
    ("study", "counts", "work", "subsets"),
    [
        # trainings: the teacher (855 steps), the noise-unconditional student and 3 seeds x 4 subsets x ADM (300
        # each), 3 x 4 x SAM (300 each). Evaluations: 26 pipelines, 25 students against the teacher, 6 empirical
        # denoisers. Forwards: each pipeline 100 samples x 20 steps + PFD 2 x 200 noises x 20 steps = 10,000 (x 26);
        # E_gen 8,000 (x 25); the sweep 100 x 20 (x 6) = 472,000. InceptionV3: 100 x (26 + 6).
        (
            "digits-generalization.yaml",
            "26 trainings and 57 evaluations",
            "work: 4,755 training steps and 3,600 SAM steps (two passes each); 472,000 UNet image-forwards of "
            "evaluation (sampling steps and loss terms) and 3,200 generated images",
            (32, 128, 512, 1797),
        ),
        # trainings: the teacher (2,000 steps) and 3 subsets x (2,000 + 8,000); evaluations: 7 pipelines and 6
        # students against the teacher. Forwards: each pipeline 100 x 20 + PFD 2 x 200 x 20 = 10,000 (x 7), E_gen
        # 8,000 (x 6) = 118,000; InceptionV3: 100 x 7.
        (
            "fashion-mnist-memorization-sweep.yaml",
            "7 trainings and 13 evaluations",
            "work: 32,000 training steps and 0 SAM steps (two passes each); 118,000 UNet image-forwards of "
            "evaluation (sampling steps and loss terms) and 700 generated images",
            (32, 128, 512),
        ),
    ],
)
def test_the_shipped_generalization_studies_check_and_cost_what_a_hand_count_says(
    study, counts, work, subsets, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    run_study.main(run_study.parse_args(["--study", f"studies/{study}", "--output_dir", str(tmp_path), "--dry_run"]))
    printed = capsys.readouterr().out
    assert f"{counts} (shard 1/1)" in printed and work in printed
    g = Study.load(REPO / "studies" / study).generalization
    assert g.subsets == subsets and g.teacher_seed == 0


@pytest.mark.slow
def test_a_shard_whose_students_wait_for_another_shards_teacher_says_so(tmp_path, capsys, pooled_inception):
    # runs: adm-teacher-seed0, adm-nu-n16-seed0, then the 8 students; shard 3/10 holds adm-n16-seed1 only
    path = write_generalization_study(tmp_path / "study.yaml")
    out = tmp_path / "out"
    status, err = run_cli(run_study, ["--study", path, "--output_dir", out, "--shard", "3/10"], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status != 0 and len(errors) == 1, err
    assert "--shard 3/10: the E_gen evaluations need the teacher adm-teacher-seed0, which another shard trains" in err
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["adm-n16-seed1"]
    # what it could do is done: the student trained and evaluated, not against the missing teacher
    assert (out / "eval" / "adm-n16-seed1-raw" / "eval_results.json").exists()
    assert not (out / "eval" / "adm-n16-seed1-raw-teacher").exists()
