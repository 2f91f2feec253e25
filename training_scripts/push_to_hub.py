"""Push a trained (and possibly evaluated) train_flat_ddpm.py output dir to the Hugging Face Hub.

    python training_scripts/push_to_hub.py --model_path ddpm-flat-digits --hub_model_id you/ddpm-flat-digits

Uploads the pipeline(s), the refreshed model card, evaluation results and plots; never checkpoints, optimizer state,
logs or the token. The token comes from --hub_token, else from `hf auth login` / HF_TOKEN.
"""

from __future__ import annotations

import argparse

from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from diffusers_flat.hub.push import push_to_hub
from diffusers_flat.utils.cli import OneLineArgumentParser, run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True, help="An output dir of train_flat_ddpm.py.")
    parser.add_argument("--hub_model_id", required=True, help="The repo to create or update: 'user/name'.")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the repo private.")
    parser.add_argument("--hub_token", default=None, help="A write token; default: the stored login or HF_TOKEN.")
    parser.add_argument(
        "--model_card_template",
        default=None,
        help="A Jinja card template of your own (see model_cards/); default: the run's.",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    url = push_to_hub(
        args.model_path,
        args.hub_model_id,
        private=args.hub_private_repo,
        token=args.hub_token,
        template=args.model_card_template,
    )
    print(f"Pushed {args.model_path} to {url}")


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse `argv`, push, and report what stops the push as one line (exit status 1)."""
    run_main(
        main,
        parse_args(argv),
        (OfflineModeIsEnabled, HfHubHTTPError),
        {"output_dir": "--model_path", "template": "--model_card_template"},
    )


if __name__ == "__main__":
    cli()
