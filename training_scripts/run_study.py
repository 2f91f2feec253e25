"""Run a flatness study: train the paper's grid over several seeds, evaluate every variant, and report the claims.

    python training_scripts/run_study.py --study studies/digits.yaml --output_dir study-digits

Each training is an `accelerate launch` subprocess of train_flat_ddpm.py (your accelerate config applies), logging
to `<output_dir>/logs/<run>.log`; each of its pipelines (raw, EMA, SWA) is then evaluated with evaluate_flat.py's
settings from the study file, all with the same real images, (x0, t, eps) triples and sampling noise. Re-running
the command skips what is finished and resumes an interrupted training from its latest checkpoint; `--shard I/N`
does every N-th run (the shards 1..N partition the grid); `--report_only` reports what is finished; `--dry_run`
lists the runs and evaluations without doing any.
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
from diffusers_flat.run_directory import VARIANTS, RunDirectory
from diffusers_flat.study import Run, Study, parse_shard, row_name, shard_of
from diffusers_flat.study_report import Results, write_report

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_flat_ddpm.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="A study file (YAML), e.g. studies/digits.yaml.")
    parser.add_argument("--output_dir", required=True, help="Where the runs, evaluations and the report go.")
    parser.add_argument("--shard", default="1/1", help="I/N: do every N-th run, from the I-th.")
    parser.add_argument("--report_only", action="store_true", help="Only aggregate what is finished.")
    parser.add_argument("--dry_run", action="store_true", help="List the runs and evaluations; do none.")
    return parser.parse_args(argv)


def parse_quietly(parse, argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """A script's own parser on `argv`: the parsed flags, or None and what the parser says of them."""
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.suppress(SystemExit):
        return parse(argv), None
    return None, err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]


def check_study(study: Study) -> None:
    """Parse every training's and the evaluation's flags with the scripts' own parsers, before anything starts."""
    for run in study.runs():
        _, problem = parse_quietly(train_flat_ddpm.parse_args, [*run.flags, "--output_dir", "x"])
        if problem:
            raise UsageError(f"--study {study.path}: the {run.method} training's flags: {problem}")
    args, problem = parse_quietly(evaluate_flat.parse_args, ["--model_path", "x", *study.evaluation])
    if problem:
        raise UsageError(f"--study {study.path}: the evaluation's flags: {problem}")
    try:
        evaluate_flat.settings_from(args)
    except FlatError as err:
        raise UsageError(f"--study {study.path}: the evaluation's flags: {flag_message(err)}") from None


def train(run: Run, out: Path) -> None:
    """Train `run` into out/runs/<name> unless it finished before; resume it if it was interrupted."""
    run_dir, log = out / "runs" / run.name, out / "logs" / f"{run.name}.log"
    if (out / "done" / run.name).exists():
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
    (out / "done").mkdir(exist_ok=True)
    (out / "done" / run.name).touch()


def evaluation_dir(out: Path, run: Run, variant: str) -> Path:
    return out / "eval" / f"{run.name}-{variant}"


def evaluate(run: Run, variant: str, study: Study, out: Path) -> None:
    """Evaluate one pipeline of a finished run, unless done before (evaluate_flat.py writes its JSON last)."""
    target = evaluation_dir(out, run, variant)
    if (target / "eval_results.json").exists():
        return
    argv = ["--model_path", str(out / "runs" / run.name), "--variant", variant, "--output_dir", str(target)]
    argv += ["--cache_dir", str(out / "fid_cache"), *study.evaluation]
    evaluate_flat.main(evaluate_flat.parse_args(argv))


def collect(study: Study, out: Path) -> Results:
    """The finished evaluations, by row and seed."""
    results: Results = {}
    for run in study.runs():
        for variant in VARIANTS:
            path = evaluation_dir(out, run, variant) / "eval_results.json"
            if path.exists():
                result = next(iter(json.loads(path.read_text()).values()))
                results.setdefault(row_name(run.method, variant), {})[run.seed] = result
    return results


def workload(study: Study, runs: list[Run]) -> str:
    """The study's work in the units `benchmarks/evaluation.py` measures rates in, for a projection on your GPU."""
    steps = 0
    for run in runs:
        args = train_flat_ddpm.parse_args([*run.flags, "--output_dir", "x"])
        if args.max_train_steps is None:
            return "work: set --max_train_steps in the study to project its cost"
        steps += args.max_train_steps * (2 if args.sam_rho > 0 else 1)  # SAM: two passes per step
    settings = evaluate_flat.settings_from(evaluate_flat.parse_args(["--model_path", "x", *study.evaluation]))
    weights = 1 + len(settings.quantize)  # fp32 and each quantized copy sample the same noise
    images = len(runs) * len(VARIANTS) * settings.num_samples * len(settings.inference_steps) * weights
    unet_passes = len(runs) * len(VARIANTS) * settings.num_samples * sum(settings.inference_steps) * weights
    return (
        f"work: {steps:,} forward-backward passes of training (a SAM step is two); {images:,} generated images "
        f"({unet_passes:,} UNet image-steps) and as many InceptionV3 images, plus {settings.num_real:,} real ones "
        "once. Divide by the rates `python benchmarks/evaluation.py --device cuda` prints on your GPU for hours."
    )


def main(args: argparse.Namespace) -> None:
    study = Study.load(args.study)
    index, count = parse_shard(args.shard)
    check_study(study)
    out = Path(args.output_dir)
    runs = shard_of(study.runs(), index, count)
    if args.dry_run:
        for run in runs:
            print(f"train {run.name}: {' '.join(run.flags)} --output_dir {out / 'runs' / run.name}")
            for variant in VARIANTS:
                row = row_name(run.method, variant)
                print(f"  evaluate {run.name} {variant} ({row}) -> {evaluation_dir(out, run, variant)}")
        print(f"{len(runs)} trainings and {len(runs) * len(VARIANTS)} evaluations (shard {index}/{count})")
        print(workload(study, runs))
        return
    if not args.report_only:
        with tqdm(total=len(runs) * (1 + len(VARIANTS)), desc="Study") as progress:
            for run in runs:
                train(run, out)
                progress.update(1)
                for variant in VARIANTS:
                    evaluate(run, variant, study, out)
                    progress.update(1)
    report = write_report(collect(study, out), {"study": str(study.path), "evaluation": list(study.evaluation)}, out)
    print(report)


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse `argv`, run the study, and report bad input as one line naming the flag."""
    run_main(main, parse_args(argv), flags={"study": "--study", "shard": "--shard"})


if __name__ == "__main__":
    cli()
