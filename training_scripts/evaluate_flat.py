"""Evaluate trained DDPM pipelines: FID at few and many steps, LPF, loss under perturbation, the loss surface,
exposure bias, memorization and FID under weight quantization, per model and side by side.

    python training_scripts/evaluate_flat.py --model_path ddpm-flat-digits [more dirs] --output_dir eval [--quantize 8]
    accelerate launch --num_processes 8 training_scripts/evaluate_flat.py --model_path ...  # 8 GPUs share the sampling

The measurements are the library's (`diffusers_flat.evaluation`); each model's report goes to
`<output_dir>/<model>/` and into its run directory (`evaluation/`, with a refreshed model card), the side-by-side
report to `<output_dir>`.
"""

from __future__ import annotations

import argparse
import logging

from accelerate import PartialState

from diffusers_flat.evaluation.arguments import add_evaluation_arguments, run_options, settings_from
from diffusers_flat.evaluation.report import markdown_report
from diffusers_flat.evaluation.runs import evaluate_runs
from diffusers_flat.hub.model_card import write_model_card
from diffusers_flat.run_directory import VARIANTS
from diffusers_flat.utils.cli import OneLineArgumentParser, run_main
from diffusers_flat.utils.processes import leave_without_teardown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", nargs="+", required=True, help="Output dirs of train_flat_ddpm.py.")
    parser.add_argument("--variant", default="raw", help=f"Which weights of each model: {', '.join(VARIANTS)}.")
    parser.add_argument("--output_dir", default="eval")
    parser.add_argument("--cache_dir", default=None, help="Where real-image FID statistics are cached.")
    add_evaluation_arguments(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    settings = settings_from(args)
    results = evaluate_runs(
        args.model_path, args.variant, settings, args.output_dir, cache_dir=args.cache_dir, **run_options(args)
    )
    if results:  # the main process: each card shows its run's new evaluation
        for path in args.model_path:
            write_model_card(path)
        print(markdown_report(results, list(settings.inference_steps)))


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse `argv`, evaluate, and report bad input as one line naming the flag (exit status 1)."""
    flags = {"bits": "--quantize", "granularity": "--quantize_granularity", "q": "--pfd_reference"}
    flags |= {"steps": "--pfd_steps"}
    run_main(main, parse_args(argv), flags=flags)
    processes = PartialState()
    processes.wait_for_everyone()
    leave_without_teardown(processes)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    cli()
