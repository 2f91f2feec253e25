"""Run a flatness study: train the paper's grid over several seeds, evaluate every variant, and report the claims.

    python training_scripts/run_study.py --study studies/digits.yaml --output_dir study-digits

Each training is an `accelerate launch` subprocess of train_flat_ddpm.py (your accelerate config applies), logging
to `<output_dir>/logs/<run>.log`; each of its pipelines (raw, EMA, SWA) is then evaluated with the study file's
evaluation settings, all with the same real images, (x0, t, eps) triples and sampling noise. Re-running the command
skips what is finished and resumes an interrupted training from its latest checkpoint; `--shard I/N` does every
N-th run (the shards 1..N partition the grid); `--executor ray` runs every task on a Ray cluster instead;
`--report_only` reports what is finished; `--dry_run` lists the runs and evaluations without doing any; `--rates`
(what benchmarks/study_cost.py measured) projects a dry run's hours and shows a run's hours left; `--from_report
REPORT_JSON` writes a finished study's report again into --output_dir from its report.json alone (after a change of
the analysis, without the runs). `--export DIR` then copies what the report reads (done records, evaluation JSON,
training curves, the picture) into DIR and writes the report there: DIR is what you commit (a few MB, no weights),
and `--report_only --output_dir DIR` regenerates it.

A study with `tuning` first trains the tuned method at each candidate value on
the tuning seed, evaluates the pipeline the selection reads, and gives the grid's runs of that method the value with
the lowest selection metric (the tuning table is in the report). A study with `generalization` trains every method
and seed on nested random subsets of the data, and a teacher on all of it; each student is also evaluated against
the teacher (E_gen, PFD), and the empirical denoiser of one subset is evaluated at each temperature
(studies/digits-generalization.yaml). The library's `StudyPlan` lists the work, `StudyRunner` does it and
`StudyResults` reports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers_flat.studies.config import Study, parse_shard
from diffusers_flat.studies.directory import StudyDirectory
from diffusers_flat.studies.plan import StudyPlan, read_rates
from diffusers_flat.studies.ray_executor import RayStudyRunner
from diffusers_flat.studies.results import StudyResults, report_from_json
from diffusers_flat.studies.runner import StudyRunner
from diffusers_flat.utils.cli import OneLineArgumentParser, UsageError, run_main

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_flat_ddpm.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="A study file (YAML), e.g. studies/digits.yaml.")
    parser.add_argument("--output_dir", required=True, help="Where the runs, evaluations and the report go.")
    parser.add_argument("--shard", default="1/1", help="I/N: do every N-th run, from the I-th.")
    parser.add_argument(
        "--executor",
        default="local",
        choices=("local", "ray"),
        help="local: one task after another here; ray: every task on a Ray cluster, as many at once as it allows.",
    )
    parser.add_argument(
        "--ray_address",
        default=None,
        help="With --executor ray: the cluster (auto: the one this node belongs to); default: this machine alone.",
    )
    parser.add_argument("--report_only", action="store_true", help="Only aggregate what is finished.")
    parser.add_argument("--dry_run", action="store_true", help="List the runs and evaluations; do none.")
    parser.add_argument(
        "--from_report", default=None, help="A finished study's report.json: write its report again from it alone."
    )
    parser.add_argument(
        "--export",
        default=None,
        help="After the run (or --report_only): copy what the report reads into this folder and report there.",
    )
    parser.add_argument(
        "--rates",
        default=None,
        help="The JSON benchmarks/study_cost.py wrote for this study on your device: --dry_run projects the hours, a "
        "run shows the hours left.",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    study = Study.load(args.study)
    if args.from_report:
        print(report_from_json(args.from_report, study, args.output_dir))
        return
    index, count = parse_shard(args.shard)
    plan = StudyPlan(study, StudyDirectory(args.output_dir))
    if args.rates and args.report_only:
        raise UsageError("--rates costs a --dry_run or a run: leave out --report_only")
    rates = read_rates(args.rates, study) if args.rates else None
    if args.dry_run:
        tuned, _ = StudyResults(plan).tuning_table()
        print(plan.dry_run(index, count, tuned, rates))
        return
    if args.executor == "ray" and (count != 1 or args.report_only):
        raise UsageError("--executor ray runs the whole study on the cluster: leave out --shard and --report_only")
    if args.ray_address and args.executor != "ray":
        raise UsageError("--ray_address names the cluster of --executor ray: add --executor ray")
    if args.executor == "ray":
        RayStudyRunner(plan, TRAIN_SCRIPT, args.ray_address, study.resources, rates).run()
    elif not args.report_only:
        StudyRunner(plan, TRAIN_SCRIPT).run(index, count, rates)
    if args.export:
        plan = StudyPlan(study, plan.directory.export(args.export))
    print(StudyResults(plan).report())


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse `argv`, run the study, and report bad input as one line naming the flag."""
    run_main(
        main,
        parse_args(argv),
        flags={"study": "--study", "shard": "--shard", "from_report": "--from_report", "destination": "--export"},
    )


if __name__ == "__main__":
    cli()
