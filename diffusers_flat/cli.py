"""What the command-line scripts share: errors reported as one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path


class UsageError(ValueError):
    """A flag value that cannot work; reported as one line."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: argparse's usage block buries the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_main(main: Callable[[argparse.Namespace], None], args: argparse.Namespace, expected: tuple[type, ...]) -> None:
    """Call `main(args)`; an `expected` error becomes one line on stderr (from the first process only, when several
    run) and exit status 1, instead of a traceback."""
    try:
        main(args)
    except expected as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{Path(sys.argv[0]).name}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
