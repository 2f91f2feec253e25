"""Run a flatness study: train the paper's grid over several seeds, evaluate every variant, and report the claims.

    python training_scripts/run_study.py --study studies/digits.yaml --output_dir study-digits

Each training is an `accelerate launch` subprocess of train_flat_ddpm.py (your accelerate config applies), logging
to `<output_dir>/logs/<run>.log`; each of its pipelines (raw, EMA, SWA) is then evaluated with evaluate_flat.py's
settings from the study file, all with the same real images, (x0, t, eps) triples and sampling noise. Re-running
the command skips what is finished and resumes an interrupted training from its latest checkpoint; `--shard I/N`
does every N-th run (the shards 1..N partition the grid); `--report_only` reports what is finished; `--dry_run`
lists the runs and evaluations without doing any. A study with `tuning` first trains the tuned method at each
candidate value on the tuning seed, evaluates the pipeline the selection reads, and gives the grid's runs of that
method the value with the lowest selection metric (the tuning table is in the report). A study with
`generalization` trains every method and seed on nested random subsets of the data, and a teacher on all of it;
each student is also evaluated against the teacher (E_gen, PFD), and the empirical denoiser of one subset is
evaluated at each temperature (studies/digits-generalization.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import evaluate_flat
import train_flat_ddpm
from diffusers import DDPMPipeline
from tqdm.auto import tqdm

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.evaluate import evaluate as evaluate_model
from diffusers_flat.evaluation.evaluate import resolve_device, set_fid_reference
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.evaluation.settings import EvaluationSettings, evaluation_work
from diffusers_flat.metrics.empirical_score import EmpiricalDenoiser
from diffusers_flat.metrics.fid import FID, InceptionFeatures
from diffusers_flat.run_directory import RunDirectory, write_json
from diffusers_flat.studies.config import Run, Study, Work, parse_shard, row_name, shard_of
from diffusers_flat.studies.generalization_report import write_generalization_report
from diffusers_flat.studies.report import Results, write_report
from diffusers_flat.training.data import load_image_dataset, subset_indices
from diffusers_flat.utils.cli import OneLineArgumentParser, UsageError, flag_message, run_main

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_flat_ddpm.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="A study file (YAML), e.g. studies/digits.yaml.")
    parser.add_argument("--output_dir", required=True, help="Where the runs, evaluations and the report go.")
    parser.add_argument("--shard", default="1/1", help="I/N: do every N-th run, from the I-th.")
    parser.add_argument("--report_only", action="store_true", help="Only aggregate what is finished.")
    parser.add_argument("--dry_run", action="store_true", help="List the runs and evaluations; do none.")
    parser.add_argument(
        "--rates",
        default=None,
        help="With --dry_run: the JSON benchmarks/study_cost.py wrote for this study on your device; projects hours.",
    )
    return parser.parse_args(argv)


def parse_quietly(parse, argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """A script's own parser on `argv`: the parsed flags, or None and what the parser says of them."""
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.suppress(SystemExit):
        return parse(argv), None
    return None, err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]


def check_evaluation(study: Study, flags: tuple[str, ...], what: str) -> EvaluationSettings:
    """The evaluation settings of `flags`, parsed by evaluate_flat.py's own parser and checked."""
    args, problem = parse_quietly(evaluate_flat.parse_args, ["--model_path", "x", *flags])
    if problem:
        raise UsageError(f"--study {study.path}: {what}: {problem}")
    try:
        return evaluate_flat.settings_from(args)
    except FlatError as err:
        raise UsageError(f"--study {study.path}: {what}: {flag_message(err)}") from None


def check_study(study: Study) -> None:
    """Parse every training's and evaluation's flags with the scripts' own parsers, before anything starts."""
    tuning = study.tuning
    for run in study.tuning_runs() + study.teacher_runs() + study.runs(tuning.values[0] if tuning else None):
        _, problem = parse_quietly(train_flat_ddpm.parse_args, [*run.flags, "--output_dir", "x"])
        if problem:
            raise UsageError(f"--study {study.path}: the {run.name} training's flags: {problem}")
    check_evaluation(study, study.evaluation, "the evaluation's flags")
    if study.generalization:
        check_generalization(study)
    if tuning:
        settings = check_evaluation(study, tuning.evaluation, "the tuning's evaluation flags")
        if "fid" not in settings.metrics or tuning.inference_steps not in settings.inference_steps:
            raise UsageError(
                f"--study {study.path}: the tuning selects by {tuning.metric} at T'={tuning.inference_steps}: its "
                f"evaluation flags must measure fid with --inference_steps including {tuning.inference_steps}"
            )


def check_generalization(study: Study) -> None:
    """The subsets against the dataset's size, and the E_gen and sweep evaluations' flags."""
    g = study.generalization
    args = train_flat_ddpm.parse_args([*study.teacher_runs()[0].flags, "--output_dir", "x"])
    try:
        dataset, _ = load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir)
        for subset in g.subsets:
            subset_indices(len(dataset), subset)
    except FlatError as err:
        raise UsageError(f"--study {study.path}: generalization.subsets: {flag_message(err)}") from None
    # the runner gives the E_gen evaluation its reference: the teacher
    teacher = check_evaluation(study, (*g.teacher_evaluation, "--pfd_reference", "teacher"), "teacher_evaluation")
    if "pfd" not in teacher.metrics or "--pfd_reference" in g.teacher_evaluation:
        raise UsageError(
            f"--study {study.path}: generalization.teacher_evaluation must measure pfd and leave --pfd_reference to "
            "the runner (the teacher)"
        )
    if g.temperatures:
        check_evaluation(study, g.empirical_evaluation, "generalization.empirical_evaluation")


def train(run: Run, out: Path) -> None:
    """Train `run` into out/runs/<name> unless it finished before; resume it if it was interrupted."""
    run_dir, log, done = out / "runs" / run.name, out / "logs" / f"{run.name}.log", out / "done" / run.name
    if done.exists():
        if json.loads(done.read_text()) != list(run.flags):  # e.g. the study file changed, or the tuned value
            raise UsageError(
                f"--output_dir {out}: {run.name} was trained with other flags than the study's now; remove "
                f"{run_dir} and {done}, or use another --output_dir"
            )
        return
    checkpoints = RunDirectory(run_dir).checkpoints() if run_dir.is_dir() else []
    again = ["--resume_from_checkpoint", "latest"] if checkpoints else ["--overwrite_output_dir"]
    command = [sys.executable, "-m", "accelerate.commands.launch", str(TRAIN_SCRIPT), *run.flags]
    command += ["--output_dir", str(run_dir), *again]
    tqdm.write(f"training {run.name}{' (resumed)' if checkpoints else ''}: log {log}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as stream:
        status = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise UsageError(f"--study: training {run.name} failed (exit status {status}); see {log}")
    done.parent.mkdir(exist_ok=True)
    write_json(done, list(run.flags))  # what the run was trained with, checked when the study runs again


def evaluation_dir(out: Path, run: Run, variant: str, suffix: str = "") -> Path:
    return out / "eval" / f"{run.name}-{variant}{suffix}"


def evaluate(run: Run, variant: str, flags: tuple[str, ...], out: Path, suffix: str = "") -> None:
    """Evaluate one pipeline of a finished run, unless done before (evaluate_flat.py writes its JSON last)."""
    target = evaluation_dir(out, run, variant, suffix)
    if (target / "eval_results.json").exists():
        return
    argv = ["--model_path", str(out / "runs" / run.name), "--variant", variant, "--output_dir", str(target)]
    argv += ["--cache_dir", str(out / "fid_cache"), *flags]
    evaluate_flat.main(evaluate_flat.parse_args(argv))


def finished_result(out: Path, run: Run, variant: str, suffix: str = "") -> dict | None:
    """The evaluation result of a run's pipeline, or None while it is not finished."""
    path = evaluation_dir(out, run, variant, suffix) / "eval_results.json"
    return next(iter(json.loads(path.read_text()).values())) if path.exists() else None


def collect(study: Study, out: Path) -> Results:
    """The finished evaluations of the grid, by row and seed."""
    results: Results = {}
    for run in study.runs():
        for variant in study.variants:
            result = finished_result(out, run, variant)
            if result is not None:
                results.setdefault(row_name(run.method, variant), {})[run.seed] = result
    return results


PROJECT_HINT = (
    "for hours on your device: python benchmarks/study_cost.py --study STUDY --output rates.json, then this command "
    "with --rates rates.json"
)


def read_rates(path: str, study: Study) -> dict:
    """The rates benchmarks/study_cost.py measured for this study."""
    try:
        rates = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--rates {path}: not a readable JSON file ({err})") from None
    if Path(str(rates.get("study"))).name != study.path.name:
        raise UsageError(f"--rates {path}: measured for study {rates.get('study')}, not {study.path}")
    return rates


def tuning_table(study: Study, out: Path) -> tuple[str | None, list[dict]]:
    """The tuned value (None until every candidate is evaluated) and the tuning table's rows."""
    tuning = study.tuning
    if tuning is None:
        return None, []
    rows = []
    for run in study.tuning_runs():
        value = run.flags[run.flags.index(tuning.flag) + 1] if tuning.flag in run.flags else None
        rows.append({"run": run.name, "value": value, "result": finished_result(out, run, tuning.variant)})
    candidates = [row for row in rows if row["value"] is not None]
    if any(row["result"] is None for row in candidates):
        return None, rows
    selected = tuning.select({row["value"]: tuning.score(row["result"]) for row in candidates})
    for row in candidates:
        row["selected"] = row["value"] == selected
    return selected, rows


def workload(study: Study, tuning_runs: list[Run], teachers: list[Run], grid: list[Run], sweep: bool) -> Work:
    """The work of these runs and their evaluations (tuning runs: one pipeline each, with the tuning's flags; a
    generalization study's students: E_gen too; `sweep`: the empirical denoiser's temperatures)."""
    steps = {False: 0, True: 0}  # SAM or not -> optimizer steps
    for run in tuning_runs + teachers + grid:
        args = train_flat_ddpm.parse_args([*run.flags, "--output_dir", "x"])
        if args.max_train_steps is None:
            raise UsageError(f"--study {study.path}: set --max_train_steps in its training flags to cost it")
        steps[args.sam_rho > 0] += args.max_train_steps
    g, pipelines = study.generalization, len(study.variants)
    evaluations = [(study.tuning.evaluation if study.tuning else (), len(tuning_runs))]
    evaluations.append((study.evaluation, (len(teachers) + len(grid)) * pipelines))
    if g:
        students = sum(against_teacher(study, run) for run in teachers + grid)
        evaluations.append(((*g.teacher_evaluation, "--pfd_reference", "teacher"), students * pipelines))
        evaluations.append((g.empirical_evaluation, len(empirical_sweep(study)) if sweep else 0))
    forwards = images = 0
    for flags, count in evaluations:
        unet, inception = evaluation_work(check_evaluation(study, flags, "the evaluation's flags"))
        forwards, images = forwards + count * unet, images + count * inception
    return Work(steps[False], steps[True], forwards, images)


def teacher_flags(study: Study, out: Path) -> tuple[str, ...]:
    """The E_gen evaluation's flags: the study's teacher_evaluation against the teacher's pipeline."""
    return (
        *study.generalization.teacher_evaluation,
        "--pfd_reference",
        str(out / "runs" / study.teacher_runs()[0].name),
    )


def empirical_sweep(study: Study) -> list[tuple[float, bool]]:
    """(temperature, noise-unconditional) of each empirical denoiser a generalization study evaluates."""
    g = study.generalization
    return [(t, False) for t in g.temperatures] + ([(1.0, True)] if g.noise_unconditional else [])


def empirical_dir(out: Path, study: Study, temperature: float, unconditional: bool) -> Path:
    name = f"empirical-{study.generalization.tag(study.generalization.empirical_subset)}-T{temperature:g}"
    return out / "eval" / (name + ("-nu" if unconditional else ""))


def evaluate_empirical(study: Study, out: Path) -> None:
    """Evaluate the empirical denoiser of the study's empirical_subset at each temperature (and its
    noise-unconditional variant), with the teacher's noise schedule and image shape; skips what is done."""
    g, teacher = study.generalization, RunDirectory(out / "runs" / study.teacher_runs()[0].name)
    todo = [(t, nu) for t, nu in empirical_sweep(study) if not (empirical_dir(out, study, t, nu) / "done").exists()]
    if not todo:
        return
    settings = check_evaluation(study, g.empirical_evaluation, "generalization.empirical_evaluation")
    device = resolve_device("auto")
    pipeline = DDPMPipeline.from_pretrained(teacher.pipeline_path("raw"))
    unet = pipeline.unet.config
    source = teacher.read_record().data.replace(train_subset=g.empirical_subset)
    real = load_real_images(source, unet.sample_size, unet.in_channels)
    fid = None
    if "fid" in settings.metrics:
        fid = FID(InceptionFeatures(), device=device)
        set_fid_reference(fid, real, settings, out / "fid_cache")
    images = real.training_images().tensors
    for temperature, unconditional in todo:
        target = empirical_dir(out, study, temperature, unconditional)
        config = {"noise_unconditional": unconditional}
        denoiser = EmpiricalDenoiser.from_training_set(images, pipeline.scheduler, temperature, **config).to(device)
        evaluation = evaluate_model(denoiser, pipeline.scheduler, real, settings, fid)
        evaluation.result.update(model=target.name, temperature=temperature, noise_unconditional=unconditional)
        evaluate_flat.write_model_report(target.name, evaluation, settings, real, target)
        write_json(target / "done", True)


def against_teacher(study: Study, run: Run) -> bool:
    """Whether `run` is a generalization study's student, evaluated against the teacher too (E_gen)."""
    return study.generalization is not None and run.tag != "teacher"


def teacher_missing(study: Study, out: Path) -> str | None:
    """What the E_gen evaluations wait for while another shard trains the teacher, or None."""
    teacher = study.teacher_runs()[0]
    if not (out / "done" / teacher.name).exists():
        return f"the E_gen evaluations need the teacher {teacher.name}, which another shard trains"
    return None


def main(args: argparse.Namespace) -> None:
    study = Study.load(args.study)
    index, count = parse_shard(args.shard)
    check_study(study)
    if args.rates and not args.dry_run:
        raise UsageError("--rates projects the cost of a --dry_run: add --dry_run")
    out = Path(args.output_dir)
    tuning_runs, teachers = study.tuning_runs(), study.teacher_runs()
    # The shards partition the tuning runs, the teachers and the grid together, by name (a run's flags may wait for
    # the tuning; a student's E_gen for the teacher).
    mine = {run.name for run in shard_of(tuning_runs + teachers + study.runs(), index, count)}
    tuning_runs, teachers = ([run for run in runs if run.name in mine] for runs in (tuning_runs, teachers))
    sweep = bool(study.generalization and teachers and teachers[0].tag == "teacher" and empirical_sweep(study))
    variant = study.tuning.variant if study.tuning else None
    if args.dry_run:
        for run in tuning_runs:
            print(f"tune {run.name}: {' '.join(run.flags)} --output_dir {out / 'runs' / run.name}")
            print(f"  evaluate {run.name} {variant} -> {evaluation_dir(out, run, variant)}")
        tuned, _ = tuning_table(study, out)
        grid = [run for run in study.runs(tuned) if run.name in mine]
        for run in teachers + grid:
            print(f"train {run.name}: {' '.join(run.flags)} --output_dir {out / 'runs' / run.name}")
            for v in study.variants:
                print(f"  evaluate {run.name} {v} ({row_name(run.method, v)}) -> {evaluation_dir(out, run, v)}")
                if against_teacher(study, run):
                    print(
                        f"  evaluate {run.name} {v} against the teacher -> {evaluation_dir(out, run, v, '-teacher')}"
                    )
        for temperature, unconditional in empirical_sweep(study) if sweep else []:
            print(f"evaluate the empirical denoiser -> {empirical_dir(out, study, temperature, unconditional)}")
        trainings = len(tuning_runs) + len(teachers) + len(grid)
        evaluations = len(tuning_runs) + (len(teachers) + len(grid)) * len(study.variants)
        if study.generalization:  # E_gen of every student, and the empirical denoisers
            students = sum(against_teacher(study, run) for run in teachers + grid)
            evaluations += students * len(study.variants) + sweep * len(empirical_sweep(study))
        print(f"{trainings} trainings and {evaluations} evaluations (shard {index}/{count})")
        # the work does not depend on which candidate wins: cost the grid with the first
        candidate = tuned or (study.tuning.values[0] if study.tuning else None)
        work = workload(
            study, tuning_runs, teachers, [run for run in study.runs(candidate) if run.name in mine], sweep
        )
        print(work.describe())
        print(work.projection(read_rates(args.rates, study)) if args.rates else PROJECT_HINT)
        return
    waiting, egen_waiting = [], None
    if not args.report_only:
        grid_size = sum(run.name in mine for run in study.runs())
        per_run = len(study.variants) * (2 if study.generalization else 1)
        total = 2 * len(tuning_runs) + (len(teachers) + grid_size) * (1 + per_run) + sweep
        with tqdm(total=total, desc="Study") as progress:
            for run in tuning_runs:
                train(run, out)
                progress.update(1)
                evaluate(run, variant, study.tuning.evaluation, out)
                progress.update(1)
            tuned, _ = tuning_table(study, out)
            grid = [run for run in study.runs(tuned) if run.name in mine]
            waiting = [run for run in grid if tuned is None and study.tuning and run.method == study.tuning.method]
            for run in teachers + [run for run in grid if run not in waiting]:
                train(run, out)
                progress.update(1)
                for v in study.variants:
                    evaluate(run, v, study.evaluation, out)
                    progress.update(1)
                    if against_teacher(study, run):
                        egen_waiting = teacher_missing(study, out)
                        if egen_waiting is None:
                            evaluate(run, v, teacher_flags(study, out), out, "-teacher")
                    progress.update(study.generalization is not None)
            if sweep:
                evaluate_empirical(study, out)
                progress.update(1)
        if waiting:
            raise UsageError(
                f"--shard {index}/{count}: the {study.tuning.method} runs take the tuned {study.tuning.flag}, and "
                "the tuning runs of other shards have not finished: run this shard again when they have"
            )
        if egen_waiting:
            raise UsageError(f"--shard {index}/{count}: {egen_waiting}: run this shard again when it has")
    if study.generalization:
        print(write_generalization_report(collect_generalization(study, out), study_settings(study), out))
        return
    tuned, tuning_rows = tuning_table(study, out)
    print(write_report(collect(study, out), study_settings(study, tuned), out, tuning_rows))


def study_settings(study: Study, tuned: str | None = None) -> dict:
    """What the report records of the study's settings."""
    settings = {"study": str(study.path), "evaluation": list(study.evaluation), "variants": list(study.variants)}
    if study.tuning:
        t = study.tuning
        settings["tuning"] = {"method": t.method, "flag": t.flag, "values": list(t.values), "seed": t.seed}
        settings["tuning"].update(metric=t.metric, inference_steps=t.inference_steps, variant=t.variant)
        settings["tuning"].update(evaluation=list(t.evaluation), selected=tuned)
    if study.generalization:
        settings["generalization"] = {**dataclasses.asdict(study.generalization), "training": list(study.training)}
        base, *treated = sorted(study.methods, key=lambda m: m != "ADM")  # each method against ADM (or the first)
        pairs = [(row_name(base, v), row_name(m, v)) for v in study.variants for m in treated]
        settings["comparisons"] = pairs
    return settings


def collect_generalization(study: Study, out: Path) -> dict:
    """A generalization study's finished evaluations: the students by row, subset and seed (E_mem in "pfd", E_gen
    in "pfd_teacher"), the teacher, the noise-unconditional student and the empirical denoiser's sweep."""

    def merged(run: Run, v: str) -> dict | None:
        result, against_teacher = finished_result(out, run, v), finished_result(out, run, v, "-teacher")
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
    sweep = []
    for temperature, nu in empirical_sweep(study):
        path = empirical_dir(out, study, temperature, nu) / "eval_results.json"
        if path.exists():
            sweep.append(json.loads(path.read_text()))
    return {
        "students": students,
        "teacher": finished_result(out, teacher, study.variants[0]),
        "noise_unconditional": merged(unconditional[0], study.variants[0]) if unconditional else None,
        "empirical": sweep,
    }


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse `argv`, run the study, and report bad input as one line naming the flag."""
    run_main(main, parse_args(argv), flags={"study": "--study", "shard": "--shard"})


if __name__ == "__main__":
    cli()
