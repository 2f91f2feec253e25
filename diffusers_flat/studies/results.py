"""What a study made, read back and reported: the tuning table, each row's results by seed, the settings, the
picture and the deployment check (each made once and kept), the training curves, and the report. It reads the study
directory only, and what `StudyDirectory.export` keeps of it is enough.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from diffusers import DDPMPipeline

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.measurements import Level, Measurements, Results, read_results
from diffusers_flat.metrics.flatness_log import FLATNESS_LOG
from diffusers_flat.quantization import DEPLOYMENT_BITS, deployment_check
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.studies.config import METHODS, FigureSpec, Run, Study, row_name
from diffusers_flat.studies.generalization_report import write_generalization_report
from diffusers_flat.studies.plan import StudyPlan
from diffusers_flat.studies.quantization_figure import figure_samples, write_quantization_figure
from diffusers_flat.studies.report import write_report


class StudyResults:
    """What a study's plan has made so far, and its report.

    Args:
        plan: the study's plan (`StudyPlan`), naming the directory read.

    Example:
        >>> from diffusers_flat.studies.directory import StudyDirectory
        >>> study = Study(Path("s.yaml"), (1, 2), {"ADM": (), "SAM": ("--sam_rho", "0.1")}, variants=("raw",))
        >>> results = StudyResults(StudyPlan(study, StudyDirectory("out")))
        >>> results.collect()  # nothing has finished
        {}
    """

    def __init__(self, plan: StudyPlan):
        self.plan = plan
        self.study, self.directory = plan.study, plan.directory

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
        scores = {row["value"]: tuning.score(Measurements.from_json(row["result"])) for row in candidates}
        selected = tuning.select(scores)
        for row in candidates:
            row["selected"] = row["value"] == selected
        return selected, rows

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
                    results.setdefault(row, {})[run.seed] = Measurements.from_json(result)
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
        sweep = [directory.result(self.plan.empirical_target(t, nu)) for t, nu in self.plan.empirical_sweep()]
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
        settings["seeds"] = list(study.seeds)
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
                there_json = None if other is None else other.json
                rows.append({"row": row_name(method, variant), "seed": seed, "here": here, "there": there_json})
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
        level = Level.parse(spec.level)
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
                        raise self.plan._error(
                            f"figure: {run.name} finished but its {spec.variant} pipeline {pipeline} is gone and its "
                            "samples were never kept; train it again into this folder (training is deterministic)"
                        )
                    fp32, moved = figure_samples(
                        pipeline, level.granularity, level.bits, spec.noises, spec.steps, sampler=spec.sampler
                    )
                    stored.parent.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(stored, fp32=fp32, quantized=moved)
                with np.load(stored) as samples:
                    rows[f"{row_name(method, spec.variant)}, seed {seed}"] = (samples["fp32"], samples["quantized"])
        if waiting:
            return None
        path = self.directory.path / "study_figure.png"
        displacement = write_quantization_figure(rows, level.granularity, level.bits, path, spec.steps, spec.sampler)
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
        level = Level.parse(spec.level)
        if level.granularity != "per_channel" or level.bits not in DEPLOYMENT_BITS:
            return None
        seed, row = self.study.seeds[0], row_name(spec.treated, spec.variant)
        kept = self.directory.record("deployment")
        if kept and (kept["row"], kept["seed"], kept["level"]) == (row, seed, spec.level):
            return kept
        run = next(r for r in self.study.runs() if r.method == spec.treated and r.seed == seed)
        if self.directory.made_with(self.directory.run(run)) is None:
            return None
        settings = self.plan.plans[spec.variant].settings
        pipeline = DDPMPipeline.from_pretrained(RunDirectory(self.directory.run(run)).pipeline_path(spec.variant))
        steps = min(settings.inference_steps)
        check = deployment_check(pipeline.unet, pipeline.scheduler, level.bits, 8, steps, settings.sampler)
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
    results = read_results(data["results"])
    curves = {name: tuple(curve) for name, curve in (data.get("loss_curves") or {}).items()}
    return write_report(results, settings, out, data.get("tuning"), curves, data.get("figure"), data.get("deployment"))
