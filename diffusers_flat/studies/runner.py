"""Running a study: every training as an `accelerate launch` of the training script, every pipeline evaluated with
the study's settings, resumable, in shards, then the report. `run_study.py` is its command line.

Every flag list of the study file is parsed and checked by the training's and the evaluation's own parsers before
anything starts; the evaluation settings are built once, here, and passed to `evaluate_runs`.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from diffusers import DDPMPipeline
from tqdm.auto import tqdm

from diffusers_flat.data.images import load_image_dataset, subset_indices
from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.arguments import parse_evaluation_flags
from diffusers_flat.evaluation.evaluate import evaluate, resolve_device, set_fid_reference
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.evaluation.registry import empirical_reference
from diffusers_flat.evaluation.report import write_comparison, write_model_report
from diffusers_flat.evaluation.runs import evaluate_runs
from diffusers_flat.evaluation.settings import EvaluationSettings, evaluation_work
from diffusers_flat.hub.model_card import write_model_card
from diffusers_flat.metrics.fid import FID, feature_network
from diffusers_flat.metrics.flatness_log import FLATNESS_LOG
from diffusers_flat.quantization import DEPLOYMENT_BITS, deployment_check
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.studies.config import METHODS, FigureSpec, Run, Study, Work, row_name, shard_of
from diffusers_flat.studies.directory import StudyDirectory
from diffusers_flat.studies.generalization_report import write_generalization_report
from diffusers_flat.studies.quantization_figure import figure_samples, write_quantization_figure
from diffusers_flat.studies.report import Results, write_report
from diffusers_flat.training.arguments import parse_training_flags
from diffusers_flat.training.config import TrainingConfig, training_config
from diffusers_flat.utils.cli import flag_message

PROJECT_HINT = (
    "for hours on your device: python benchmarks/study_cost.py --study STUDY --output rates.json, then this command "
    "with --rates rates.json"
)


@dataclass(frozen=True)
class EvaluationPlan:
    """One of a study's evaluation flag lists, parsed once: the flags (recorded as what an evaluation was made with),
    the settings and `evaluate_runs`' other keyword arguments."""

    flags: tuple[str, ...]
    settings: EvaluationSettings
    options: dict


class StudyRunner:
    """A study file run into a study directory.

    Args:
        study: the study (`Study.load`).
        directory: its output folder.
        train_script: the training script each training launches.

    Example:
        >>> runner = StudyRunner(Study.load("studies/digits.yaml"), StudyDirectory("out"), Path("train.py"))
        ... # doctest: +SKIP
        >>> runner.run()  # doctest: +SKIP
    """

    def __init__(self, study: Study, directory: StudyDirectory, train_script: Path):
        self.study, self.directory, self.train_script = study, directory, train_script
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

    # The work

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
        checkpoints = RunDirectory(target).checkpoints() if target.is_dir() else []
        again = ["--resume_from_checkpoint", "latest"] if checkpoints else ["--overwrite_output_dir"]
        command = [sys.executable, "-m", "accelerate.commands.launch", str(self.train_script), *run.flags]
        command += ["--output_dir", str(target), *again]
        tqdm.write(f"training {run.name}{' (resumed)' if checkpoints else ''}: log {log}")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as stream:
            status = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT).returncode
        if status != 0:
            raise FlatError(f"study: training {run.name} failed (exit status {status}); see {log}", "study")
        self.directory.finish(target, run.flags)

    def evaluate(self, run: Run, variant: str, plan: EvaluationPlan, against_teacher: bool = False) -> None:
        """Evaluate one pipeline of a finished run, unless it was evaluated with these flags before."""
        target = self.directory.evaluation(run, variant, against_teacher)
        if self.directory.made_with(target) == list(plan.flags):
            return
        cache = self.directory.fid_cache
        evaluate_runs([self.directory.run(run)], variant, plan.settings, target, cache_dir=cache, **plan.options)
        write_model_card(self.directory.run(run))  # the card shows the run's latest evaluation
        self.directory.finish(target, plan.flags)

    def empirical_sweep(self) -> list[tuple[float, bool]]:
        """(temperature, noise-unconditional) of each empirical denoiser a generalization study evaluates."""
        g = self.study.generalization
        return [(t, False) for t in g.temperatures] + ([(1.0, True)] if g.noise_unconditional else [])

    def empirical_target(self, temperature: float, unconditional: bool) -> Path:
        g = self.study.generalization
        return self.directory.empirical(g.tag(g.empirical_subset), temperature, unconditional)

    def evaluate_empirical(self) -> None:
        """Evaluate the empirical denoiser of the study's empirical_subset at each temperature (and its
        noise-unconditional variant), with the teacher's noise schedule and image shape; skips what is done."""
        plan, g = self.empirical_evaluation, self.study.generalization
        todo = [
            (t, nu)
            for t, nu in self.empirical_sweep()
            if self.directory.made_with(self.empirical_target(t, nu)) != list(plan.flags)
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
            target = self.empirical_target(temperature, unconditional)
            denoiser = empirical_reference(real, pipeline.scheduler, device, temperature, unconditional)
            evaluation = evaluate(denoiser, pipeline.scheduler, real, plan.settings, fid)
            evaluation.result.update(model=target.name, temperature=temperature, noise_unconditional=unconditional)
            write_model_report(target.name, evaluation, plan.settings, real, target / target.name)
            write_comparison({target.name: evaluation.result}, plan.settings, target)
            self.directory.finish(target, plan.flags)

    # What is finished

    def tuning_table(self) -> tuple[str | None, list[dict]]:
        """The tuned value (None until every candidate is evaluated) and the tuning table's rows."""
        tuning = self.study.tuning
        if tuning is None:
            return None, []
        rows = []
        for run in self.study.tuning_runs():
            value = run.flags[run.flags.index(tuning.flag) + 1] if tuning.flag in run.flags else None
            result = self.directory.result(self.directory.evaluation(run, tuning.variant))
            rows.append({"run": run.name, "value": value, "result": result})
        candidates = [row for row in rows if row["value"] is not None]
        if any(row["result"] is None for row in candidates):
            return None, rows
        selected = tuning.select({row["value"]: tuning.score(row["result"]) for row in candidates})
        for row in candidates:
            row["selected"] = row["value"] == selected
        return selected, rows

    def against_teacher(self, run: Run) -> bool:
        """Whether `run` is a generalization study's student, evaluated against the teacher too (E_gen)."""
        return self.study.generalization is not None and run.tag != "teacher"

    def teacher_missing(self) -> str | None:
        """What the E_gen evaluations wait for while another shard trains the teacher, or None."""
        teacher = self.study.teacher_runs()[0]
        if self.directory.made_with(self.directory.run(teacher)) is None:
            return f"the E_gen evaluations need the teacher {teacher.name}, which another shard trains"
        return None

    def collect(self) -> Results:
        """The finished evaluations of the grid, by row and seed (a raw pipeline's with the LPF series its training
        logged under `--flatness_every`, as "flatness_series")."""
        results: Results = {}
        reuse = self.study.reuse
        reused = reuse.results if reuse else {}
        for run in self.study.runs():
            for variant in self.study.variants:
                row = row_name(run.method, variant)
                if reuse and reuse.covers(run):  # the other study's run, read from its report
                    results.setdefault(row, {})[run.seed] = reused[row][run.seed]
                    continue
                result = self.directory.result(self.directory.evaluation(run, variant))
                log = self.directory.run(run) / FLATNESS_LOG
                if result is not None and variant == "raw" and log.is_file():  # LPF of the trained weights by step
                    result["flatness_series"] = json.loads(log.read_text())
                if result is not None:
                    results.setdefault(row, {})[run.seed] = result
        return results

    def collect_generalization(self) -> dict:
        """A generalization study's finished evaluations: the students by row, subset and seed (E_mem in "pfd",
        E_gen in "pfd_teacher"), the teacher, the noise-unconditional student and the empirical denoiser's sweep."""
        study, directory = self.study, self.directory

        def merged(run: Run, v: str) -> dict | None:
            result = directory.result(directory.evaluation(run, v))
            against_teacher = directory.result(directory.evaluation(run, v, against_teacher=True))
            if result is not None and against_teacher is not None:
                result["pfd_teacher"] = against_teacher["pfd"]
            return result

        students: dict[str, dict[int, dict[int, dict]]] = {}
        for run in study.runs():
            subset = int(run.flags[run.flags.index("--train_subset") + 1])
            for v in study.variants:
                if (result := merged(run, v)) is not None:
                    students.setdefault(row_name(run.method, v), {}).setdefault(subset, {})[run.seed] = result
        teacher, *unconditional = study.teacher_runs()
        sweep = [directory.result(self.empirical_target(t, nu)) for t, nu in self.empirical_sweep()]
        return {
            "students": students,
            "teacher": directory.result(directory.evaluation(teacher, study.variants[0])),
            "noise_unconditional": merged(unconditional[0], study.variants[0]) if unconditional else None,
            "empirical": [result for result in sweep if result is not None],
        }

    def settings_record(self, tuned: str | None = None) -> dict:
        """What the report records of the study's settings."""
        study = self.study
        settings = {"study": str(study.path), "evaluation": list(study.evaluation), "variants": list(study.variants)}
        if study.tuning:
            t = study.tuning
            settings["tuning"] = {"method": t.method, "flag": t.flag, "values": list(t.values), "seed": t.seed}
            settings["tuning"].update(metric=t.metric, inference_steps=t.inference_steps, variant=t.variant)
            settings["tuning"].update(evaluation=list(t.evaluation), selected=tuned)
        if study.generalization:
            settings["generalization"] = {**dataclasses.asdict(study.generalization), "training": list(study.training)}
        if study.fraction_kept:
            f = study.fraction_kept
            settings["fraction_kept"] = {"of": f.of, "methods": f.others(study.methods), "granularity": f.granularity}
            settings["fraction_kept"]["bits"] = f.bits
        if study.variant_evaluation:
            settings["variant_evaluation"] = {v: list(flags) for v, flags in study.variant_evaluation.items()}
        if study.primary:
            settings["primary"] = dataclasses.asdict(study.primary)
            settings["family"] = [dataclasses.asdict(spec) for spec in study.family]
            settings["exploratory"] = [dataclasses.asdict(spec) for spec in study.exploratory]
        if study.reuse:
            settings["reuse"] = {"study": str(study.reuse.study), "report": str(study.reuse.report)}
            settings["reuse"].update(runs=study.reuse.runs, reproduction=self.reproduction())
        if study.generalization or not set(study.methods) <= set(METHODS):  # not the paper's grid: comparisons
            base, *treated = sorted(study.methods, key=lambda m: m != "ADM")  # each method against ADM (or the first)
            pairs = [(row_name(base, v), row_name(m, v)) for v in study.variants for m in treated]
            settings["comparisons"] = pairs
        return settings

    def reproduction(self) -> list[dict]:
        """The check that reused runs reproduce: for each reused method and variant, its first seed's results here
        (trained again) and in the other study's report, side by side."""
        study, reuse = self.study, self.study.reuse
        seed, there = study.seeds[0], reuse.results
        rows = []
        for method in reuse.runs:
            run = next(r for r in study.runs() if r.method == method and r.seed == seed)
            for variant in study.variants:
                here = self.directory.result(self.directory.evaluation(run, variant))
                other = there.get(row_name(method, variant), {}).get(seed)
                rows.append({"row": row_name(method, variant), "seed": seed, "here": here, "there": other})
        return rows

    def figure(self) -> dict | None:
        """The picture the study file names (`figure`): each of its seeds' rows, fp32 beside the quantized level.
        Each row's samples are drawn as soon as its run has finished and kept (figure/<run>.npz, a few KB), so the
        picture needs no weights once drawn; it is made when every row is there and kept (figure.json) with the spec
        it was drawn for. None without one (pictures are never chosen from results) or while a row waits for its
        run; a study that predates declared figures keeps the record it was given."""
        spec, kept = self.study.figure, self.directory.record("figure")
        if spec is None or (kept and all(kept.get(k) == v for k, v in _json_ready(spec).items())):
            return kept
        bits, granularity = spec.level.split(":")
        rows, waiting = {}, False
        for seed in spec.seeds:
            for method in spec.rows:
                run = next(r for r in self.study.runs() if r.method == method and r.seed == seed)
                stored = self.directory.figure_samples(run)
                if not stored.is_file():
                    if self.directory.made_with(self.directory.run(run)) is None:
                        waiting = True  # still training
                        continue
                    pipeline = RunDirectory(self.directory.run(run)).pipeline_path(spec.variant)
                    if not pipeline.is_dir():
                        raise self._error(
                            f"figure: {run.name} finished but its {spec.variant} pipeline {pipeline} is gone and its "
                            "samples were never kept; train it again into this folder (training is deterministic)"
                        )
                    fp32, moved = figure_samples(
                        pipeline, granularity, int(bits), spec.noises, spec.steps, sampler=spec.sampler
                    )
                    stored.parent.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(stored, fp32=fp32, quantized=moved)
                with np.load(stored) as samples:
                    rows[f"{row_name(method, spec.variant)}, seed {seed}"] = (samples["fp32"], samples["quantized"])
        if waiting:
            return None
        path = self.directory.path / "study_figure.png"
        displacement = write_quantization_figure(rows, granularity, int(bits), path, spec.steps, spec.sampler)
        self.directory.keep("figure", {"path": path.name, **_json_ready(spec), "displacement": displacement})
        return self.directory.record("figure")

    def deployment(self) -> dict | None:
        """The deployment check of a study whose primary endpoint is at a level torchao stores for real (8 or 4 bits
        per channel): the primary's treated row at the first seed, its int-b model saved and reloaded against the
        direct b-bit model, 8 samples of the evaluation's sampler at its first T' (`deployment_check`), made once
        and kept (deployment.json). None otherwise, or while that run has not finished."""
        spec = self.study.primary
        if spec is None or spec.level is None:
            return None
        bits, granularity = spec.level.split(":")
        if granularity != "per_channel" or int(bits) not in DEPLOYMENT_BITS:
            return None
        seed, row = self.study.seeds[0], row_name(spec.treated, spec.variant)
        kept = self.directory.record("deployment")
        if kept and (kept["row"], kept["seed"], kept["level"]) == (row, seed, spec.level):
            return kept
        run = next(r for r in self.study.runs() if r.method == spec.treated and r.seed == seed)
        if self.directory.made_with(self.directory.run(run)) is None:
            return None
        settings = self.plans[spec.variant].settings
        pipeline = DDPMPipeline.from_pretrained(RunDirectory(self.directory.run(run)).pipeline_path(spec.variant))
        steps = min(settings.inference_steps)
        check = deployment_check(pipeline.unet, pipeline.scheduler, int(bits), 8, steps, settings.sampler)
        self.directory.keep("deployment", {"row": row, "seed": seed, "level": spec.level, **check})
        return self.directory.record("deployment")

    def loss_curves(self) -> dict[str, tuple[list[int], list[float]]]:
        """The training loss of each method's finished run at the first seed."""
        runs = self.study.runs()[: len(self.study.methods)]
        return {run.name: curve for run in runs if (curve := self.directory.loss_curve(run)) is not None}

    def report(self) -> str:
        """Write the report of what is finished; returns its summary."""
        if self.study.generalization:
            return write_generalization_report(
                self.collect_generalization(), self.settings_record(), self.directory.path
            )
        tuned, tuning_rows = self.tuning_table()
        results, settings = self.collect(), self.settings_record(tuned)
        figure = self.figure()
        loss_curves, deployment = self.loss_curves(), self.deployment()
        return write_report(results, settings, self.directory.path, tuning_rows, loss_curves, figure, deployment)

    # Shards

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

    def workload(self, tuning_runs: list[Run], teachers: list[Run], grid: list[Run], sweep: bool) -> Work:
        """The work of these runs and their evaluations (tuning runs: one pipeline each, with the tuning's settings;
        a generalization study's students: E_gen too; `sweep`: the empirical denoiser's temperatures)."""
        steps = {False: 0, True: 0}  # SAM or not -> optimizer steps
        for run in tuning_runs + teachers + grid:
            args = self._training_flags(run.flags, f"the {run.name} training's flags")
            if args.max_train_steps is None:
                raise self._error("set --max_train_steps in its training flags to cost it")
            steps[args.uses_sam] += args.max_train_steps
        pipelines = len(self.study.variants)
        evaluations = [(self.plans[v], len(teachers) + len(grid)) for v in self.study.variants]
        if self.tuning_evaluation:
            evaluations.append((self.tuning_evaluation, len(tuning_runs)))
        if self.study.generalization:
            students = sum(self.against_teacher(run) for run in teachers + grid)
            evaluations.append((self.teacher_evaluation, students * pipelines))
            if self.empirical_evaluation and sweep:
                evaluations.append((self.empirical_evaluation, len(self.empirical_sweep())))
        forwards = images = 0
        for plan, count in evaluations:
            unet, inception = evaluation_work(plan.settings)
            forwards, images = forwards + count * unet, images + count * inception
        return Work(steps[False], steps[True], forwards, images)

    def dry_run(self, index: int, count: int, rates: dict | None = None) -> str:
        """What the shard would do, run by run and evaluation by evaluation, with its work (and hours at `rates`)."""
        study, directory = self.study, self.directory
        tuning_runs, teachers, mine, sweep = self.shard(index, count)
        variant = study.tuning.variant if study.tuning else None
        lines = []
        for run in tuning_runs:
            lines.append(f"tune {run.name}: {' '.join(run.flags)} --output_dir {directory.run(run)}")
            lines.append(f"  evaluate {run.name} {variant} -> {directory.evaluation(run, variant)}")
        tuned, _ = self.tuning_table()
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
        # the work does not depend on which candidate wins: cost the grid with the first
        candidate = tuned or (study.tuning.values[0] if study.tuning else None)
        work = self.workload(
            tuning_runs, teachers, [run for run in study.to_train(candidate) if run.name in mine], sweep
        )
        lines.append(work.describe())
        lines.append(work.projection(rates) if rates else PROJECT_HINT)
        return "\n".join(lines)

    def run(self, index: int = 1, count: int = 1) -> None:
        """Train and evaluate what shard `index` of `count` holds, skipping what is finished. Raises a FlatError
        naming `shard` when some of its work waits for another shard (run it again when that one has finished)."""
        study = self.study
        tuning_runs, teachers, mine, sweep = self.shard(index, count)
        grid_size = sum(run.name in mine for run in study.to_train())
        per_run = len(study.variants) * (2 if study.generalization else 1)
        total = 2 * len(tuning_runs) + (len(teachers) + grid_size) * (1 + per_run) + sweep
        egen_waiting = None
        with tqdm(total=total, desc="Study") as progress:
            for run in tuning_runs:
                self.train(run)
                progress.update(1)
                self.evaluate(run, study.tuning.variant, self.tuning_evaluation)
                progress.update(1)
            tuned, _ = self.tuning_table()
            grid = [run for run in study.to_train(tuned) if run.name in mine]
            waiting = [run for run in grid if tuned is None and study.tuning and run.method == study.tuning.method]
            for run in teachers + [run for run in grid if run not in waiting]:
                self.train(run)
                progress.update(1)
                for v in study.variants:
                    self.evaluate(run, v, self.plans[v])
                    progress.update(1)
                    if self.against_teacher(run):
                        egen_waiting = self.teacher_missing()
                        if egen_waiting is None:
                            self.evaluate(run, v, self.teacher_evaluation, against_teacher=True)
                    progress.update(study.generalization is not None)
            if sweep:
                self.evaluate_empirical()
                progress.update(1)
        if waiting:
            raise FlatError(
                f"shard {index}/{count}: the {study.tuning.method} runs take the tuned {study.tuning.flag}, and the "
                "tuning runs of other shards have not finished: run this shard again when they have",
                "shard",
            )
        if egen_waiting:
            raise FlatError(f"shard {index}/{count}: {egen_waiting}: run this shard again when it has", "shard")


def _json_ready(spec: FigureSpec) -> dict:
    """A figure spec as its JSON record holds it (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def report_from_json(report: str | Path, study: Study, out: str | Path) -> str:
    """Write `study`'s finished report again into `out` from its report.json alone (its results, settings, tuning,
    training curves and picture), with today's report code: how a committed report takes up a change of the
    analysis without its runs. The picture's file is not redrawn. Returns the Markdown."""
    try:
        data = json.loads(Path(report).read_text())
        settings = data["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FlatError(f"from_report {report}: not the report.json of a study ({err})", "from_report") from None
    if Path(settings.get("study", "")) != study.path:
        raise FlatError(
            f"from_report {report}: the report of {settings.get('study')}, not of {study.path}", "from_report"
        )
    if settings.get("generalization"):

        def by_int(tree: dict, depth: int) -> dict:
            return {int(k): by_int(v, depth - 1) for k, v in tree.items()} if depth else tree

        collected = {key: data.get(key) for key in ("teacher", "noise_unconditional", "empirical")}
        collected["students"] = {row: by_int(sizes, 2) for row, sizes in data["students"].items()}
        return write_generalization_report(collected, settings, out)
    results = {row: {int(seed): result for seed, result in seeds.items()} for row, seeds in data["results"].items()}
    curves = {name: tuple(curve) for name, curve in (data.get("loss_curves") or {}).items()}
    return write_report(results, settings, out, data.get("tuning"), curves, data.get("figure"), data.get("deployment"))


def read_rates(path: str | Path, study: Study) -> dict:
    """The rates benchmarks/study_cost.py measured for this study."""
    try:
        rates = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise FlatError(f"rates {path}: not a readable JSON file ({err})", "rates") from None
    if Path(str(rates.get("study"))).name != study.path.name:
        raise FlatError(f"rates {path}: measured for study {rates.get('study')}, not {study.path}", "rates")
    return rates
