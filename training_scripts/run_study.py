"""Run a flatness study: train the paper's grid over several seeds, evaluate every variant, and report the claims.

    python training_scripts/run_study.py --study studies/digits.yaml --output_dir study-digits

Each training is an `accelerate launch` subprocess of train_flat_ddpm.py (your accelerate config applies), logging
to `<output_dir>/logs/<run>.log`; each of its pipelines (raw, EMA, SWA) is then evaluated with evaluate_flat.py's
settings from the study file, all with the same real images, (x0, t, eps) triples and sampling noise. Re-running
the command skips what is finished and resumes an interrupted training from its latest checkpoint; `--shard I/N`
does every N-th run (the shards 1..N partition the grid); `--report_only` reports what is finished; `--dry_run`
lists the runs and evaluations without doing any. A study with `tuning` first trains the tuned method at each
candidate value on the tuning seed, evaluates the pipeline the selection reads, and gives the grid's runs of that
method the value with the lowest selection metric (the tuning table is in the report).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import evaluate_flat
import train_flat_ddpm
from tqdm.auto import tqdm

from diffusers_flat.cli import OneLineArgumentParser, UsageError, flag_message, run_main
from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation import EvaluationSettings, evaluation_work
from diffusers_flat.run_directory import VARIANTS, RunDirectory, write_json
from diffusers_flat.study import Run, Study, Work, parse_shard, row_name, shard_of
from diffusers_flat.study_report import Results, write_report

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
    for run in study.tuning_runs() + study.runs(tuning.values[0] if tuning else None):
        _, problem = parse_quietly(train_flat_ddpm.parse_args, [*run.flags, "--output_dir", "x"])
        if problem:
            raise UsageError(f"--study {study.path}: the {run.name} training's flags: {problem}")
    check_evaluation(study, study.evaluation, "the evaluation's flags")
    if tuning:
        settings = check_evaluation(study, tuning.evaluation, "the tuning's evaluation flags")
        if "fid" not in settings.metrics or tuning.inference_steps not in settings.inference_steps:
            raise UsageError(
                f"--study {study.path}: the tuning selects by {tuning.metric} at T'={tuning.inference_steps}: its "
                f"evaluation flags must measure fid with --inference_steps including {tuning.inference_steps}"
            )


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


def evaluation_dir(out: Path, run: Run, variant: str) -> Path:
    return out / "eval" / f"{run.name}-{variant}"


def evaluate(run: Run, variant: str, flags: tuple[str, ...], out: Path) -> None:
    """Evaluate one pipeline of a finished run, unless done before (evaluate_flat.py writes its JSON last)."""
    target = evaluation_dir(out, run, variant)
    if (target / "eval_results.json").exists():
        return
    argv = ["--model_path", str(out / "runs" / run.name), "--variant", variant, "--output_dir", str(target)]
    argv += ["--cache_dir", str(out / "fid_cache"), *flags]
    evaluate_flat.main(evaluate_flat.parse_args(argv))


def finished_result(out: Path, run: Run, variant: str) -> dict | None:
    """The evaluation result of a run's pipeline, or None while it is not finished."""
    path = evaluation_dir(out, run, variant) / "eval_results.json"
    return next(iter(json.loads(path.read_text()).values())) if path.exists() else None


def collect(study: Study, out: Path) -> Results:
    """The finished evaluations of the grid, by row and seed."""
    results: Results = {}
    for run in study.runs():
        for variant in VARIANTS:
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


def workload(study: Study, tuning_runs: list[Run], grid: list[Run]) -> Work:
    """The work of these runs and their evaluations (tuning runs: one pipeline each, with the tuning's flags)."""
    steps = {False: 0, True: 0}  # SAM or not -> optimizer steps
    for run in tuning_runs + grid:
        args = train_flat_ddpm.parse_args([*run.flags, "--output_dir", "x"])
        if args.max_train_steps is None:
            raise UsageError(f"--study {study.path}: set --max_train_steps in its training flags to cost it")
        steps[args.sam_rho > 0] += args.max_train_steps
    forwards = images = 0
    evaluations = [(study.tuning.evaluation if study.tuning else (), len(tuning_runs))]
    for flags, pipelines in [*evaluations, (study.evaluation, len(grid) * len(VARIANTS))]:
        unet, inception = evaluation_work(check_evaluation(study, flags, "the evaluation's flags"))
        forwards, images = forwards + pipelines * unet, images + pipelines * inception
    return Work(steps[False], steps[True], forwards, images)


def main(args: argparse.Namespace) -> None:
    study = Study.load(args.study)
    index, count = parse_shard(args.shard)
    check_study(study)
    if args.rates and not args.dry_run:
        raise UsageError("--rates projects the cost of a --dry_run: add --dry_run")
    out = Path(args.output_dir)
    tuning_runs = study.tuning_runs()
    # The shards partition the tuning runs and the grid together, by name (a run's flags wait for the tuning).
    mine = {run.name for run in shard_of(tuning_runs + study.runs(), index, count)}
    tuning_runs = [run for run in tuning_runs if run.name in mine]
    variant = study.tuning.variant if study.tuning else None
    if args.dry_run:
        for run in tuning_runs:
            print(f"tune {run.name}: {' '.join(run.flags)} --output_dir {out / 'runs' / run.name}")
            print(f"  evaluate {run.name} {variant} -> {evaluation_dir(out, run, variant)}")
        tuned, _ = tuning_table(study, out)
        grid = [run for run in study.runs(tuned) if run.name in mine]
        for run in grid:
            print(f"train {run.name}: {' '.join(run.flags)} --output_dir {out / 'runs' / run.name}")
            for v in VARIANTS:
                print(f"  evaluate {run.name} {v} ({row_name(run.method, v)}) -> {evaluation_dir(out, run, v)}")
        trainings, evaluations = len(tuning_runs) + len(grid), len(tuning_runs) + len(grid) * len(VARIANTS)
        print(f"{trainings} trainings and {evaluations} evaluations (shard {index}/{count})")
        # the work does not depend on which candidate wins: cost the grid with the first
        candidate = tuned or (study.tuning.values[0] if study.tuning else None)
        work = workload(study, tuning_runs, [run for run in study.runs(candidate) if run.name in mine])
        print(work.describe())
        print(work.projection(read_rates(args.rates, study)) if args.rates else PROJECT_HINT)
        return
    if not args.report_only:
        grid_size = sum(run.name in mine for run in study.runs())
        with tqdm(total=2 * len(tuning_runs) + grid_size * (1 + len(VARIANTS)), desc="Study") as progress:
            for run in tuning_runs:
                train(run, out)
                progress.update(1)
                evaluate(run, variant, study.tuning.evaluation, out)
                progress.update(1)
            tuned, _ = tuning_table(study, out)
            grid = [run for run in study.runs(tuned) if run.name in mine]
            waiting = [run for run in grid if tuned is None and study.tuning and run.method == study.tuning.method]
            for run in [run for run in grid if run not in waiting]:
                train(run, out)
                progress.update(1)
                for v in VARIANTS:
                    evaluate(run, v, study.evaluation, out)
                    progress.update(1)
        if waiting:
            raise UsageError(
                f"--shard {index}/{count}: the {study.tuning.method} runs take the tuned {study.tuning.flag}, and "
                "the tuning runs of other shards have not finished: run this shard again when they have"
            )
    tuned, tuning_rows = tuning_table(study, out)
    settings = {"study": str(study.path), "evaluation": list(study.evaluation)}
    if study.tuning:
        t = study.tuning
        settings["tuning"] = {"method": t.method, "flag": t.flag, "values": list(t.values), "seed": t.seed}
        settings["tuning"].update(metric=t.metric, inference_steps=t.inference_steps, variant=t.variant)
        settings["tuning"].update(evaluation=list(t.evaluation), selected=tuned)
    print(write_report(collect(study, out), settings, out, tuning_rows))


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse `argv`, run the study, and report bad input as one line naming the flag."""
    run_main(main, parse_args(argv), flags={"study": "--study", "shard": "--shard"})


if __name__ == "__main__":
    cli()
