"""The Ray executor on a real local Ray cluster of this machine: a micro study run by Ray writes what the local
executor writes; a training whose Ray worker is killed mid-run is retried and resumes exactly; a failing run is
retried, then fails the study in one line naming it and its log; a node that does not see the study directory
refuses to run."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import run_study
import torch
from conftest import REPO, TREE_MARKER, kill_tree
from helpers import write_study
from safetensors.torch import load_file

from diffusers_flat.errors import FlatError
from diffusers_flat.studies.config import Study
from diffusers_flat.studies.directory import StudyDirectory
from diffusers_flat.studies.plan import StudyPlan
from diffusers_flat.studies.ray_executor import RETRIES, TOKEN, RayStudyRunner, StudyContext

pytest.importorskip("ray")
# one worker runs them, one local Ray cluster at a time
pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.xdist_group("ray")]

EVALUATION = ["--metrics", "lpf", "exposure_bias", "--inference_steps", "2", "--lpf_draws", "2", "--loss_samples", "8"]
EVALUATION += ["--exposure_samples", "4"]


def study_file(tmp_path, **overrides):
    settings = {"tuning": None, "variants": ["raw", "ema"], "evaluation": EVALUATION} | overrides
    return write_study(tmp_path / "study.yaml", **settings)


def evaluations(out) -> dict:
    """Every evaluation result of a study directory, less where its model was read from."""
    found = {}
    for path in sorted((out / "eval").glob("*/eval_results.json")):
        (result,) = json.loads(path.read_text()).values()
        found[path.parent.name] = {k: v for k, v in result.items() if k not in ("path", "sampling_seconds")}
    return found


def test_a_micro_study_on_ray_writes_what_the_local_executor_writes(tmp_path, capsys):
    path = study_file(tmp_path, seeds=[1])
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(tmp_path / "local")]))
    rates = {"study": "study.yaml", "device": "cpu", "plain_steps_per_s": 0.05, "sam_steps_per_s": 0.05}
    rates |= {"unet_image_forwards_per_s": 0.05, "inception_images_per_s": 0.05}
    (tmp_path / "rates.json").write_text(json.dumps(rates))
    argv = ["--study", str(path), "--output_dir", str(tmp_path / "ray"), "--executor", "ray"]
    run_study.main(run_study.parse_args([*argv, "--rates", str(tmp_path / "rates.json")]))
    # one bar for the study: 2 trainings of 3 steps and 4 evaluations of 8 x (1 + 2) loss terms and 2 x 4 x 2 exposure
    # forwards: 6 + 4 x 40 = 166 at 0.05 a second = 0.92 h, one task at a time (each takes the node's CPUs)
    bar = capsys.readouterr().err
    assert "Study (Ray):   0%|          | 0/6" in bar and "0.9 h left" in bar
    assert "6/6" in bar and "0.0 h left" in bar
    # each training's torch threads: its task's CPUs, all the cores this process may use (a local cluster is given
    # them: Ray alone would count the machine's, ignoring a pinned test worker's one core)
    for run in ("adm-seed1", "sam-seed1"):
        trained_with = json.loads((tmp_path / "ray" / "runs" / run / "training_args.json").read_text())
        assert trained_with["num_cpu_threads"] == len(os.sched_getaffinity(0))
    local, ray = evaluations(tmp_path / "local"), evaluations(tmp_path / "ray")
    assert len(local) == 4 and local == ray  # 2 methods x 2 pipelines, identical
    assert sorted(p.name for p in (tmp_path / "ray" / "done").iterdir()) == sorted(
        p.name for p in (tmp_path / "local" / "done").iterdir()
    )
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("local", "ray")]
    assert reports[0]["claims"] == reports[1]["claims"]
    # run again: everything is finished, nothing is redone
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("eval_results.json")}
    run_study.main(run_study.parse_args(argv))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_training_whose_worker_is_killed_is_retried_and_resumes_exactly(tmp_path):
    training = ["--checkpointing_steps", "5", "--max_train_steps", "30"]
    path = study_file(tmp_path, seeds=[1], methods={"ADM": training})
    out, marker = tmp_path / "ray", "ray-kill-test"
    command = [sys.executable, str(REPO / "training_scripts" / "run_study.py"), "--study", str(path)]
    command += ["--output_dir", str(out), "--executor", "ray"]
    process = subprocess.Popen(command, env={**os.environ, TREE_MARKER: marker}, cwd=REPO, start_new_session=True)
    try:
        run = out / "runs" / "adm-seed1"
        deadline = time.monotonic() + 300
        while not (run / "checkpoint-10").is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "checkpoint-10").is_dir(), "the training never reached its second checkpoint"
        group = int((run / "training.pgid").read_text())
        worker = psutil.Process(group).parent()  # the Ray worker running the training task
        os.kill(worker.pid, signal.SIGKILL)
        assert process.wait(timeout=600) == 0
    finally:
        kill_tree(marker)
    assert "Resumed from" in (out / "logs" / "adm-seed1.log").read_text()  # the retry went on from a checkpoint
    # the same run trained by the local executor, never interrupted
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(tmp_path / "local")]))
    killed = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    whole = load_file(tmp_path / "local" / "runs" / "adm-seed1" / "unet" / "diffusion_pytorch_model.safetensors")
    assert killed.keys() == whole.keys() and all(torch.equal(killed[k], whole[k]) for k in whole)


def test_a_failing_run_is_retried_then_fails_the_study_in_one_line_naming_its_log(tmp_path):
    path = study_file(tmp_path, seeds=[1], methods={"ADM": []})
    failing = tmp_path / "failing_train.py"  # a training script that fails at once, every time
    failing.write_text("import sys\nprint('this training fails')\nsys.exit(3)\n")
    plan = StudyPlan(Study.load(path), StudyDirectory(tmp_path / "ray"))
    with pytest.raises(FlatError, match=r"^study: train adm-seed1 failed after 2 retries; see .*adm-seed1\.log$"):
        RayStudyRunner(plan, failing).run()
    log = (tmp_path / "ray" / "logs" / "adm-seed1.log").read_text()
    assert log.count("this training fails") == 1 + RETRIES  # Ray ran it again, twice
    assert not (tmp_path / "ray" / "done").exists()


def test_a_task_that_does_not_see_the_study_directory_refuses(tmp_path):
    (tmp_path / TOKEN).write_text("the driver's")
    context = StudyContext("s.yaml", str(tmp_path), "train.py", str(tmp_path), token="another driver's")
    with pytest.raises(FlatError, match="does not see the study directory the driver wrote"):
        context.runner()
