"""What the command-line scripts share: errors reported as one line."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """A flag value that cannot work; reported as one line."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: argparse's usage block buries the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
