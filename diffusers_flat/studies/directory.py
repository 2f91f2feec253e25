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

Example:
    >>> from diffusers_flat.studies.config import Run
    >>> directory = StudyDirectory("study-digits")
    >>> directory.evaluation(Run("SAM", 1, ()), "ema", against_teacher=True).as_posix()
    'study-digits/eval/sam-seed1-ema-teacher'
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusers_flat.run_directory import write_json
from diffusers_flat.studies.config import Run

TEACHER_SUFFIX = "-teacher"


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
        return next(iter(json.loads((evaluation / "eval_results.json").read_text()).values()))
