"""Running a study's plan (`StudyPlan`) here: every training as an `accelerate launch` of the training script, every
pipeline evaluated with the study's settings, one task after another, resumable, shard by shard. `run_study.py` is
its command line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from diffusers import DDPMPipeline
from tqdm.auto import tqdm

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.evaluate import evaluate, resolve_device, set_fid_reference
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.evaluation.registry import empirical_reference
from diffusers_flat.evaluation.report import write_comparison, write_model_report
from diffusers_flat.evaluation.runs import evaluate_runs
from diffusers_flat.hub.model_card import write_model_card
from diffusers_flat.metrics.fid import FID, feature_network
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.studies.config import Run
from diffusers_flat.studies.plan import EMPIRICAL, TRAIN, EvaluationPlan, StudyPlan, Task
from diffusers_flat.studies.progress import StudyProgress
from diffusers_flat.studies.results import StudyResults
from diffusers_flat.training.config import training_config


class TaskFailed(FlatError):
    """A training whose process failed (or was killed): running the task again resumes it from its checkpoint."""


PROCESS_GROUP = "training.pgid"  # in a run directory: the process group of the training running there


def stop_stale_training(target: Path) -> None:
    """Stop what is left of a training of `target` whose runner died (killed with its worker, say): its process
    group, by the id it recorded, so that the run is not written by two trainings at once."""
    record = target / PROCESS_GROUP
    if not record.is_file():
        return
    try:
        os.killpg(int(record.read_text()), signal.SIGKILL)
    except (ValueError, ProcessLookupError, PermissionError):
        pass  # gone already (or the id was reused by another user's process, which is not ours to stop)
    record.unlink(missing_ok=True)


class StudyRunner:
    """The local executor of a study's plan: its tasks one after another in this process, each skipped when it has
    finished before, an interrupted training resumed from its latest checkpoint.

    Args:
        plan: the study's plan (`StudyPlan`).
        train_script: the training script each training launches.
        cpu_threads: torch threads of each training and evaluation on the CPU (a cluster task's share of its node;
            a run's own `--num_cpu_threads` wins); None: each takes this machine's cores.

    Example:
        >>> plan = StudyPlan(Study.load("studies/digits.yaml"), StudyDirectory("out"))  # doctest: +SKIP
        >>> StudyRunner(plan, Path("train.py")).run(1, 3)  # doctest: +SKIP
    """

    def __init__(self, plan: StudyPlan, train_script: Path, cpu_threads: int | None = None):
        self.plan, self.train_script, self.cpu_threads = plan, train_script, cpu_threads
        self.study, self.directory = plan.study, plan.directory

    def train(self, run: Run) -> None:
        """Train `run` unless it finished before; resume it if it was interrupted."""
        target, log = self.directory.run(run), self.directory.log(run)
        made_with = self.directory.made_with(target)
        if made_with is not None:
            if made_with != list(run.flags):  # e.g. the study file changed, or the tuned value
                raise FlatError(
                    f"output_dir {self.directory.path}: {run.name} was trained with other flags than the study's "
                    f"now; remove {target} and its done marker, or use another --output_dir",
                    "output_dir",
                )
            return
        stop_stale_training(target)
        checkpoints = RunDirectory(target).checkpoints() if target.is_dir() else []
        again = ["--resume_from_checkpoint", "latest"] if checkpoints else ["--overwrite_output_dir"]
        threads = ["--num_cpu_threads", str(self.cpu_threads)] if self.cpu_threads else []
        command = [sys.executable, "-m", "accelerate.commands.launch", str(self.train_script), *threads, *run.flags]
        command += ["--output_dir", str(target), *again]
        tqdm.write(f"training {run.name}{' (resumed)' if checkpoints else ''}: log {log}")
        log.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as stream:  # in a process group of its own, recorded: what a retry stops first
            process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
            (target / PROCESS_GROUP).write_text(str(process.pid))
            try:
                status = process.wait()
            except BaseException:  # Ctrl-C or the executor stopping: the training stops with its runner
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        (target / PROCESS_GROUP).unlink(missing_ok=True)
        if status != 0:
            raise TaskFailed(f"study: training {run.name} failed (exit status {status}); see {log}", "study")
        self.directory.finish(target, run.flags)

    def evaluate(self, run: Run, variant: str, plan: EvaluationPlan, against_teacher: bool = False) -> None:
        """Evaluate one pipeline of a finished run, unless it was evaluated with these flags before."""
        target = self.directory.evaluation(run, variant, against_teacher)
        if self.directory.made_with(target) == list(plan.flags):
            return
        cache = self.directory.fid_cache
        evaluate_runs(
            [self.directory.run(run)],
            variant,
            plan.settings,
            target,
            cache_dir=cache,
            cpu_threads=self.cpu_threads,
            **plan.options,
        )
        write_model_card(self.directory.run(run))  # the card shows the run's latest evaluation
        self.directory.finish(target, plan.flags)

    def evaluate_empirical(self) -> None:
        """Evaluate the empirical denoiser of the study's empirical_subset at each temperature (and its
        noise-unconditional variant), with the teacher's noise schedule and image shape; skips what is done."""
        plan, g = self.plan.empirical_evaluation, self.study.generalization
        todo = [
            (t, nu)
            for t, nu in self.plan.empirical_sweep()
            if self.directory.made_with(self.plan.empirical_target(t, nu)) != list(plan.flags)
        ]
        if not todo:
            return
        teacher = RunDirectory(self.directory.run(self.study.teacher_runs()[0]))
        device = resolve_device(plan.options["device"])
        pipeline = DDPMPipeline.from_pretrained(teacher.pipeline_path("raw"))
        unet = pipeline.unet.config
        source = training_config(teacher).data.replace(train_subset=g.empirical_subset)
        real = load_real_images(source, unet.sample_size, unet.in_channels)
        fid = None
        if "fid" in plan.settings.metrics:
            features = feature_network(plan.settings.features, plan.options["fid_dtype"], plan.settings.dinov2_model)
            fid = FID(features, batch_size=plan.options["fid_batch_size"], device=device)
            set_fid_reference(fid, real, plan.settings, self.directory.fid_cache)
        for temperature, unconditional in todo:
            target = self.plan.empirical_target(temperature, unconditional)
            denoiser = empirical_reference(real, pipeline.scheduler, device, temperature, unconditional)
            evaluation = evaluate(denoiser, pipeline.scheduler, real, plan.settings, fid)
            evaluation.result.update(model=target.name, temperature=temperature, noise_unconditional=unconditional)
            write_model_report(target.name, evaluation, plan.settings, real, target / target.name)
            write_comparison({target.name: evaluation.result}, plan.settings, target)
            self.directory.finish(target, plan.flags)

    def teacher_missing(self) -> str | None:
        """What the E_gen evaluations wait for while another shard trains the teacher, or None."""
        teacher = self.study.teacher_runs()[0]
        if self.directory.made_with(self.directory.run(teacher)) is None:
            return f"the E_gen evaluations need the teacher {teacher.name}, which another shard trains"
        return None

    def execute(self, task: Task) -> None:
        """Do one task of the plan (skipped when it has finished before)."""
        if task.kind == TRAIN:
            self.train(task.run)
        elif task.kind == EMPIRICAL:
            self.evaluate_empirical()
        else:
            self.evaluate(task.run, task.variant, task.plan, task.against_teacher)

    def run(self, index: int = 1, count: int = 1, rates: dict | None = None) -> None:
        """Do what shard `index` of `count` holds, skipping what is finished: the tuning's tasks first, then the grid's
        with the tuned value; `rates` (`read_rates`): the bar shows the hours left. Raises a FlatError naming `shard`
        when some of its work waits for another shard (run it again when that one has finished)."""
        plan, study = self.plan, self.study
        tuning = plan.tuning_tasks(index, count)
        egen_waiting = None
        with StudyProgress(plan, plan.tasks(index, count), rates) as progress:
            for task in tuning:
                self.execute(task)
                progress.done(task)
            tuned, _ = StudyResults(plan).tuning_table()
            grid, waiting = plan.grid_tasks(index, count, tuned)
            for task in grid:
                if task.against_teacher and (egen_waiting := self.teacher_missing()) is not None:
                    progress.done(task)  # E_gen waits for the teacher another shard trains
                    continue
                self.execute(task)
                progress.done(task)
        if waiting:
            raise FlatError(
                f"shard {index}/{count}: the {study.tuning.method} runs take the tuned {study.tuning.flag}, and the "
                "tuning runs of other shards have not finished: run this shard again when they have",
                "shard",
            )
        if egen_waiting:
            raise FlatError(f"shard {index}/{count}: {egen_waiting}: run this shard again when it has", "shard")
