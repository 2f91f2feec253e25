"""A study's plan: what it trains and evaluates, shard by shard, with which flags and settings, and what that costs.
Pure: it reads the study file (and checks every flag list with the training's and the evaluation's own parsers before
anything starts), never runs anything. `StudyRunner` executes it; `StudyResults` reads what it made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers_flat.data.images import load_image_dataset, subset_indices
from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.arguments import parse_evaluation_flags
from diffusers_flat.evaluation.settings import EvaluationSettings, evaluation_work
from diffusers_flat.studies.config import Run, Study, Work, row_name, shard_of
from diffusers_flat.studies.directory import StudyDirectory
from diffusers_flat.training.arguments import parse_training_flags
from diffusers_flat.training.config import TrainingConfig
from diffusers_flat.utils.cli import flag_message

PROJECT_HINT = (
    "for hours on your device: python benchmarks/study_cost.py --study STUDY --output rates.json, then this command "
    "with --rates rates.json"
)
TRAIN, EVALUATE, EMPIRICAL = "train", "evaluate", "empirical"


@dataclass(frozen=True)
class EvaluationPlan:
    """One of a study's evaluation flag lists, parsed once: the flags (recorded as what an evaluation was made with),
    the settings and `evaluate_runs`' other keyword arguments."""

    flags: tuple[str, ...]
    settings: EvaluationSettings
    options: dict


@dataclass(frozen=True)
class Task:
    """One piece of a study's work: a training (`TRAIN`), the evaluation of one of a run's pipelines (`EVALUATE`,
    with the flags of `plan`; `against_teacher`: a generalization study's E_gen), or the empirical denoiser's sweep
    (`EMPIRICAL`)."""

    kind: str
    run: Run | None = None
    variant: str | None = None
    plan: EvaluationPlan | None = None
    against_teacher: bool = False


class StudyPlan:
    """A study file's plan in a study directory.

    Args:
        study: the study (`Study.load`).
        directory: its output folder (the plan names paths in it; it reads nothing there).

    Example:
        >>> study = Study(Path("s.yaml"), (1, 2), {"ADM": (), "SAM": ("--sam_rho", "0.1")}, variants=("raw", "ema"))
        >>> tasks, waiting = StudyPlan(study, StudyDirectory("out")).grid_tasks(2, 4, tuned=None)
        >>> [(task.kind, task.run.name, task.variant) for task in tasks]
        [('train', 'sam-seed1', None), ('evaluate', 'sam-seed1', 'raw'), ('evaluate', 'sam-seed1', 'ema')]
    """

    def __init__(self, study: Study, directory: StudyDirectory):
        self.study, self.directory = study, directory
        tuning, g = study.tuning, study.generalization
        for run in study.tuning_runs() + study.teacher_runs() + study.runs(tuning.values[0] if tuning else None):
            self._training_flags(run.flags, f"the {run.name} training's flags")
        self.evaluation = self._plan(study.evaluation, "the evaluation's flags")
        self.plans = {  # each variant's evaluation: the study's, or the variant's own (variant_evaluation)
            v: self._plan(study.variant_evaluation[v], f"variant_evaluation.{v}")
            if v in study.variant_evaluation
            else self.evaluation
            for v in study.variants
        }
        self._check_declarations()
        self.tuning_evaluation = self.teacher_evaluation = self.empirical_evaluation = None
        if tuning:
            self.tuning_evaluation = self._plan(tuning.evaluation, "the tuning's evaluation flags")
            settings = self.tuning_evaluation.settings
            if "fid" not in settings.metrics or tuning.inference_steps not in settings.inference_steps:
                raise self._error(
                    f"the tuning selects by {tuning.metric} at T'={tuning.inference_steps}: its evaluation flags "
                    f"must measure fid with --inference_steps including {tuning.inference_steps}"
                )
        fraction, ladder = study.fraction_kept, self.evaluation.settings
        if fraction and not (
            "sensitivity" in ladder.metrics
            and fraction.bits in ladder.ladder
            and fraction.granularity in ladder.ladder_granularities
        ):
            raise self._error(
                f"fraction_kept: {fraction.level} must be a level of the evaluation's sensitivity ladder"
            )
        if g:
            self._check_subsets()
            # the runner gives the E_gen evaluation its reference: the teacher's pipeline
            teacher = str(directory.run(study.teacher_runs()[0]))
            flags = (*g.teacher_evaluation, "--pfd_reference", teacher)
            self.teacher_evaluation = self._plan(flags, "teacher_evaluation")
            if "pfd" not in self.teacher_evaluation.settings.metrics or "--pfd_reference" in g.teacher_evaluation:
                raise self._error(
                    "generalization.teacher_evaluation must measure pfd and leave --pfd_reference to the runner "
                    "(the teacher)"
                )
            if g.temperatures:
                self.empirical_evaluation = self._plan(g.empirical_evaluation, "generalization.empirical_evaluation")

    def _check_declarations(self) -> None:
        """Each declared claim and the figure against what its variant's evaluation measures."""
        study = self.study
        specs = [("primary", study.primary)] if study.primary else []
        specs += [("family", spec) for spec in study.family] + [("exploratory", spec) for spec in study.exploratory]
        for key, spec in specs:
            settings = self.plans[spec.variant].settings
            what = f"{key}: {spec.measure} of {spec.treated} ({spec.variant})"
            if spec.level is not None and spec.level not in settings.quantization_levels:
                raise self._error(f"{what} at {spec.level}: the {spec.variant} evaluation must --quantize that level")
            if spec.steps is not None and spec.steps not in settings.inference_steps:
                raise self._error(f"{what}: T'={spec.steps} is not one of the evaluation's --inference_steps")
            needs = {"class_fidelity": "classifier", "lpf": "lpf"}.get(spec.measure)
            if needs == "classifier" and settings.classifier is None:
                raise self._error(f"{what}: class fidelity needs the {spec.variant} evaluation's --classifier")
            if needs == "lpf" and "lpf" not in settings.metrics:
                raise self._error(f"{what}: the {spec.variant} evaluation must measure lpf (--metrics)")
            if spec.measure.startswith("kid") and "fid" not in settings.metrics:
                raise self._error(f"{what}: the {spec.variant} evaluation must measure fid (--metrics)")

    def _error(self, problem: str) -> FlatError:
        return FlatError(f"study {self.study.path}: {problem}", "study")

    def _training_flags(self, flags: tuple[str, ...], what: str) -> TrainingConfig:
        try:
            return parse_training_flags(flags)
        except FlatError as err:
            raise self._error(f"{what}: {err}") from None

    def _plan(self, flags: tuple[str, ...], what: str) -> EvaluationPlan:
        try:
            settings, options = parse_evaluation_flags(flags)
        except FlatError as err:  # a setting is shown as the flag it comes from
            raise self._error(f"{what}: {flag_message(err)}") from None
        return EvaluationPlan(tuple(flags), settings, options)

    def _check_subsets(self) -> None:
        """The subsets against the dataset's size."""
        args = self._training_flags(self.study.teacher_runs()[0].flags, "teacher_training")
        try:
            names = (args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column)
            dataset, _ = load_image_dataset(*names, split=args.dataset_split)
            for subset in self.study.generalization.subsets:
                subset_indices(len(dataset), subset)
        except FlatError as err:
            raise self._error(f"generalization.subsets: {flag_message(err)}") from None

    def empirical_sweep(self) -> list[tuple[float, bool]]:
        """(temperature, noise-unconditional) of each empirical denoiser a generalization study evaluates."""
        g = self.study.generalization
        return [(t, False) for t in g.temperatures] + ([(1.0, True)] if g.noise_unconditional else [])

    def empirical_target(self, temperature: float, unconditional: bool) -> Path:
        g = self.study.generalization
        return self.directory.empirical(g.tag(g.empirical_subset), temperature, unconditional)

    def against_teacher(self, run: Run) -> bool:
        """Whether `run` is a generalization study's student, evaluated against the teacher too (E_gen)."""
        return self.study.generalization is not None and run.tag != "teacher"

    def shard(self, index: int, count: int) -> tuple[list[Run], list[Run], set[str], bool]:
        """This shard's tuning runs and teachers, the names of all its runs, and whether it sweeps the empirical
        denoiser. The shards partition the tuning runs, the teachers and the grid together, by name (a run's flags
        may wait for the tuning; a student's E_gen for the teacher)."""
        study = self.study
        tuning_runs, teachers = study.tuning_runs(), study.teacher_runs()
        mine = {run.name for run in shard_of(tuning_runs + teachers + study.to_train(), index, count)}
        tuning_runs, teachers = ([run for run in runs if run.name in mine] for runs in (tuning_runs, teachers))
        sweep = bool(study.generalization and teachers and teachers[0].tag == "teacher" and self.empirical_sweep())
        return tuning_runs, teachers, mine, sweep

    def tuning_tasks(self, index: int, count: int) -> list[Task]:
        """Shard `index` of `count`'s tuning runs, each trained, then its pipeline evaluated with the tuning's flags
        (`StudyResults.tuning_table` then gives the grid its value)."""
        tuning_runs, _, _, _ = self.shard(index, count)
        variant, plan = (self.study.tuning.variant, self.tuning_evaluation) if self.study.tuning else (None, None)
        return [task for run in tuning_runs for task in (Task(TRAIN, run), Task(EVALUATE, run, variant, plan))]

    def grid_tasks(self, index: int, count: int, tuned: str | None) -> tuple[list[Task], list[Run]]:
        """Shard `index` of `count`'s teachers and grid runs, each trained then evaluated pipeline by pipeline (a
        student against the teacher too), then the empirical denoiser's sweep; and the runs that wait for the tuning
        (`tuned` is None until it has finished: the tuned method's runs cannot be trained before)."""
        study = self.study
        _, teachers, mine, sweep = self.shard(index, count)
        grid = [run for run in study.to_train(tuned) if run.name in mine]
        waiting = [run for run in grid if tuned is None and study.tuning and run.method == study.tuning.method]
        tasks = []
        for run in teachers + [run for run in grid if run not in waiting]:
            tasks.append(Task(TRAIN, run))
            for v in study.variants:
                tasks.append(Task(EVALUATE, run, v, self.plans[v]))
                if self.against_teacher(run):
                    tasks.append(Task(EVALUATE, run, v, self.teacher_evaluation, against_teacher=True))
        return tasks + ([Task(EMPIRICAL)] if sweep else []), waiting

    def task_work(self, task: Task) -> Work:
        """The work of one task: a training's optimizer steps, an evaluation's UNet forwards and InceptionV3 images
        (the empirical sweep: each of its denoisers')."""
        if task.kind == TRAIN:
            args = self._training_flags(task.run.flags, f"the {task.run.name} training's flags")
            if args.max_train_steps is None:
                raise self._error("set --max_train_steps in its training flags to cost it")
            steps = args.max_train_steps
            return Work(0, steps, 0, 0) if args.uses_sam else Work(steps, 0, 0, 0)
        if task.kind == EMPIRICAL:  # each denoiser of the sweep, with the same settings
            forwards, images = evaluation_work(self.empirical_evaluation.settings)
            sweep = len(self.empirical_sweep())
            return Work(0, 0, sweep * forwards, sweep * images)
        return Work(0, 0, *evaluation_work(task.plan.settings))

    def tasks(self, index: int, count: int, tuned: str | None = None) -> list[Task]:
        """Every task of shard `index` of `count`, the grid's with the tuned value (`tuned`, or the first candidate
        until the tuning has finished: the work does not depend on which candidate wins)."""
        candidate = tuned or (self.study.tuning.values[0] if self.study.tuning else None)
        return self.tuning_tasks(index, count) + self.grid_tasks(index, count, candidate)[0]

    def workload(self, tasks: list[Task]) -> Work:
        """The work of these tasks."""
        return sum((self.task_work(task) for task in tasks), Work(0, 0, 0, 0))

    def dry_run(self, index: int, count: int, tuned: str | None = None, rates: dict | None = None) -> str:
        """What the shard would do, run by run and evaluation by evaluation, with its work (and hours at `rates`);
        `tuned`: the tuned value once the tuning has finished (`StudyResults.tuning_table`)."""
        study, directory = self.study, self.directory
        tuning_runs, teachers, mine, sweep = self.shard(index, count)
        variant = study.tuning.variant if study.tuning else None
        lines = []
        for run in tuning_runs:
            lines.append(f"tune {run.name}: {' '.join(run.flags)} --output_dir {directory.run(run)}")
            lines.append(f"  evaluate {run.name} {variant} -> {directory.evaluation(run, variant)}")
        grid = [run for run in study.to_train(tuned) if run.name in mine]
        for run in teachers + grid:
            lines.append(f"train {run.name}: {' '.join(run.flags)} --output_dir {directory.run(run)}")
            for v in study.variants:
                lines.append(
                    f"  evaluate {run.name} {v} ({row_name(run.method, v)}) -> {directory.evaluation(run, v)}"
                )
                if self.against_teacher(run):
                    target = directory.evaluation(run, v, against_teacher=True)
                    lines.append(f"  evaluate {run.name} {v} against the teacher -> {target}")
        for temperature, unconditional in self.empirical_sweep() if sweep else []:
            lines.append(f"evaluate the empirical denoiser -> {self.empirical_target(temperature, unconditional)}")
        trainings = len(tuning_runs) + len(teachers) + len(grid)
        evaluations = len(tuning_runs) + (len(teachers) + len(grid)) * len(study.variants)
        if study.generalization:  # E_gen of every student, and the empirical denoisers
            students = sum(self.against_teacher(run) for run in teachers + grid)
            evaluations += students * len(study.variants) + sweep * len(self.empirical_sweep())
        lines.append(f"{trainings} trainings and {evaluations} evaluations (shard {index}/{count})")
        if study.reuse and index == 1:
            reused = ", ".join(f"{m} seeds {', '.join(map(str, seeds))}" for m, seeds in study.reuse.runs.items())
            lines.append(f"reused from {study.reuse.report} (not trained): {reused}")
        work = self.workload(self.tasks(index, count, tuned))
        lines.append(work.describe())
        lines.append(work.projection(rates) if rates else PROJECT_HINT)
        return "\n".join(lines)


def read_rates(path: str | Path, study: Study) -> dict:
    """The rates benchmarks/study_cost.py measured for this study."""
    try:
        rates = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise FlatError(f"rates {path}: not a readable JSON file ({err})", "rates") from None
    if Path(str(rates.get("study"))).name != study.path.name:
        raise FlatError(f"rates {path}: measured for study {rates.get('study')}, not {study.path}", "rates")
    return rates
