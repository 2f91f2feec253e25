"""The layout of a study's output folder, owned here alone: the runner and the reports ask for paths, never join
them themselves.

    runs/<run>/                        each training's run directory (train_flat_ddpm.py's output_dir)
    logs/<run>.log                     its log
    eval/<run>-<variant>/              each pipeline's evaluation (evaluate_runs' report of one model)
    eval/<run>-<variant>-teacher/      a student's evaluation against the teacher (E_gen)
    eval/empirical-<subset>-T<t>[-nu]/ the empirical denoiser's evaluations
    fid_cache/                         the real images' FID statistics, shared by every evaluation
    done/<name>                        the one "finished" convention: what <name> (a run or an evaluation folder) was
                                       made with, written when it finished
    figure/<run>.npz                   the samples of a run's row of the study's picture, kept when it finished
    figure.json, deployment.json       the report's picture and deployment check, made once every run they show
                                       has finished

What the report reads is small: `export` copies it (the done records, each evaluation's eval_results.json, each
run's training_args.json, flatness log and loss curve as JSON, the picture's samples, the records above and the
picture) into a folder that is itself a study directory, without weights, checkpoints or event files. That folder is
what a study commits, and `run_study.py --report_only --output_dir FOLDER` writes the report again from it.

Example:
    >>> from diffusers_flat.studies.config import Run
    >>> directory = StudyDirectory("study-digits")
    >>> directory.evaluation(Run("SAM", 1, ()), "ema", against_teacher=True).as_posix()
    'study-digits/eval/sam-seed1-ema-teacher'
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from diffusers_flat.errors import FlatError
from diffusers_flat.metrics.flatness_log import FLATNESS_LOG
from diffusers_flat.run_directory import TRAINING_RECORD, write_json
from diffusers_flat.studies.config import Run

TEACHER_SUFFIX = "-teacher"
LOSS_CURVE = "loss_curve.json"
RESULTS = "eval_results.json"


class StudyDirectory:
    """A study's output folder.

    Args:
        path: the folder (`run_study.py --output_dir`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fid_cache = self.path / "fid_cache"

    def run(self, run: Run) -> Path:
        """The run directory a training writes."""
        return self.path / "runs" / run.name

    def log(self, run: Run) -> Path:
        return self.path / "logs" / f"{run.name}.log"

    def evaluation(self, run: Run, variant: str, against_teacher: bool = False) -> Path:
        """Where the evaluation of a run's pipeline goes (against the teacher: a generalization study's E_gen)."""
        return self.path / "eval" / f"{run.name}-{variant}{TEACHER_SUFFIX if against_teacher else ''}"

    def empirical(self, subset_tag: str, temperature: float, noise_unconditional: bool) -> Path:
        """Where the evaluation of the empirical denoiser of a subset at a temperature goes."""
        name = f"empirical-{subset_tag}-T{temperature:g}" + ("-nu" if noise_unconditional else "")
        return self.path / "eval" / name

    def _marker(self, target: Path) -> Path:
        return self.path / "done" / target.name

    def made_with(self, target: Path) -> list | None:
        """What a finished run or evaluation folder was made with (its flags), or None while it is not finished."""
        marker = self._marker(target)
        return json.loads(marker.read_text()) if marker.exists() else None

    def finish(self, target: Path, made_with: list) -> None:
        """Mark a run or evaluation folder finished, recording what it was made with (checked when the study runs
        again)."""
        self._marker(target).parent.mkdir(parents=True, exist_ok=True)
        write_json(self._marker(target), list(made_with))

    def result(self, evaluation: Path) -> dict | None:
        """The result of a finished evaluation of one model (`evaluate_runs`' side-by-side JSON of that one model), or
        None while it is not finished."""
        if self.made_with(evaluation) is None:
            return None
        return next(iter(json.loads((evaluation / RESULTS).read_text()).values()))

    def loss_curve(self, run: Run) -> tuple[list[int], list[float]] | None:
        """A finished run's training loss by step, or None: its loss_curve.json where `export` wrote one, else its
        TensorBoard events (the last value of each step, so that a resumed run's repeated steps count once)."""
        target = self.run(run)
        return None if self.made_with(target) is None else _loss_curve(target)  # unfinished: its curve ends early

    def figure_samples(self, run: Run) -> Path:
        """Where the samples of `run`'s row of the study's picture are kept."""
        return self.path / "figure" / f"{run.name}.npz"

    def record(self, name: str) -> dict | None:
        """A record the report made once (`keep`), e.g. "figure", or None."""
        path = self.path / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def keep(self, name: str, record: dict) -> None:
        write_json(self.path / f"{name}.json", record)

    def export(self, destination: str | os.PathLike) -> StudyDirectory:
        """Copy what the report reads into `destination`, a study directory of its own (see the module's docstring);
        returns it. What `destination` held of this study is replaced file by file; nothing else there is touched."""
        copy = StudyDirectory(destination)
        if copy.path.resolve() == self.path.resolve():
            raise FlatError(
                f"destination {destination}: the study directory itself; export into another folder", "destination"
            )
        done = sorted((self.path / "done").glob("*")) if (self.path / "done").is_dir() else []
        for marker in done:
            copy.finish(copy.path / marker.name, json.loads(marker.read_text()))
        for marker in done:
            evaluation, run = self.path / "eval" / marker.name, self.path / "runs" / marker.name
            if (evaluation / RESULTS).is_file():
                _copy(evaluation / RESULTS, copy.path / "eval" / marker.name / RESULTS)
            elif run.is_dir():
                for name in (TRAINING_RECORD, FLATNESS_LOG):
                    if (run / name).is_file():
                        _copy(run / name, copy.path / "runs" / marker.name / name)
                if (curve := _loss_curve(run)) is not None:
                    write_json(copy.path / "runs" / marker.name / LOSS_CURVE, list(curve), indent=None)
        for samples in sorted((self.path / "figure").glob("*.npz")):
            _copy(samples, copy.path / "figure" / samples.name)
        for name in ("figure", "deployment"):
            if (record := self.record(name)) is not None:
                copy.keep(name, record)
                if "path" in record:
                    _copy(self.path / record["path"], copy.path / record["path"])
        return copy


def _loss_curve(run: Path) -> tuple[list[int], list[float]] | None:
    if (run / LOSS_CURVE).is_file():
        steps, losses = json.loads((run / LOSS_CURVE).read_text())
        return steps, losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step = {}
    for events in sorted((run / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
        if "loss" in accumulator.Tags()["scalars"]:
            by_step.update({e.step: e.value for e in accumulator.Scalars("loss")})
    steps = sorted(by_step)
    return (steps, [by_step[step] for step in steps]) if steps else None


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
