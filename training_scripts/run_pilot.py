"""Run a training-length pilot: one training stopped at several lengths, each stage's pipeline evaluated, and the
rule of the pilot file applied to pick a study's training length.

    python training_scripts/run_pilot.py --pilot studies/fashion-mnist-deployment-pilot.yaml \
        --output_dir pilot-deployment

Each stage is an `accelerate launch` of train_flat_ddpm.py to the stage's length, resuming the last stage from its
checkpoint, then an evaluation of the pilot's variant (written to `<output_dir>/eval-<steps>/`). Re-running the command
skips finished stages and resumes an interrupted training, so the pilot runs in pieces; `pilot.json` records every
finished stage. When all have finished it writes `report.md`: each length's KID and cost, the rule's pick and the
study's projected hours (`--report_only` writes it from what is recorded). The work itself is the library's
`run_pilot` and `pilot_report` (diffusers_flat/studies/pilot.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusers_flat.studies.pilot import Pilot, pilot_report, run_pilot
from diffusers_flat.utils.cli import OneLineArgumentParser, run_main

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_flat_ddpm.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", required=True, help="A pilot file (YAML).")
    parser.add_argument("--output_dir", required=True, help="Where the run, its evaluations and the report go.")
    parser.add_argument("--report_only", action="store_true", help="Only report what pilot.json records.")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    pilot = Pilot.load(args.pilot)
    out = Path(args.output_dir)
    if args.report_only:
        record = json.loads((out / "pilot.json").read_text()) if (out / "pilot.json").is_file() else {"stages": {}}
    else:
        record = run_pilot(pilot, out, TRAIN_SCRIPT)
    print(pilot_report(pilot, record, out))


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse `argv`, run the pilot, and report bad input as one line naming the flag."""
    run_main(main, parse_args(argv), flags={"pilot": "--pilot", "output_dir": "--output_dir"})


if __name__ == "__main__":
    cli()
