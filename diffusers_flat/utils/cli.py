"""What the command-line scripts share: errors reported as one line that names the flag."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import os
import re
import shlex
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import torch

from diffusers_flat.errors import FlatError
from diffusers_flat.utils.processes import usable_cores


class UsageError(FlatError):
    """A flag value that cannot work, found by a script's own argument checks (its message names the flag)."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: argparse's usage block buries the message.

    Flags files (`@recipe.txt`, with `fromfile_prefix_chars="@"`) are read the shell's way: several flags per line,
    quotes, and `#` comments.
    """

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def docstring_args(cls: type) -> dict[str, str]:
    """Each parameter's description in the `Args:` section of `cls`'s docstring, joined into one line."""
    described, name = {}, None
    lines = (inspect.getdoc(cls) or "").splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "Args:"), len(lines))
    for line in lines[start:]:
        if not line.strip() or not line.startswith("    "):
            break
        entry = re.match(r"    (\w+): (.*)", line)
        if entry:
            name, described[entry[1]] = entry[1], entry[2]
        elif name:
            described[name] += " " + line.strip()
    return described


def add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, descriptions: dict[str, str] | None = None
) -> None:
    """A flag `--name` for each field of the dataclass `cls`, with its type, its default and, as help, its
    description in `cls`'s `Args:` (or `descriptions[name]`). `tuple[T, ...]` takes one or more values, `T | None` one
    T, a bool is a switch; a field's `metadata["choices"]` lists what it may be.

    transformers' HfArgumentParser makes flags of dataclass fields too, but not of tuple fields: the settings are
    frozen and hashable, so they are tuples, and these few lines are written by hand for them.
    """
    hints, described = typing.get_type_hints(cls), {**docstring_args(cls), **(descriptions or {})}
    for field in dataclasses.fields(cls):
        kind, options = hints[field.name], {"help": described.get(field.name)}
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # T | None
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if kind is bool:
            parser.add_argument(f"--{field.name}", action="store_true", default=default, **options)
            continue
        if typing.get_origin(kind) is tuple:
            kind, options["nargs"], default = typing.get_args(kind)[0], "+", list(default)
        if "choices" in field.metadata:
            options["choices"] = list(field.metadata["choices"])
        parser.add_argument(f"--{field.name}", type=kind, default=default, **options)


def parse_flags(parser: argparse.ArgumentParser, flags: list[str] | tuple[str, ...]) -> argparse.Namespace:
    """`parser` on a list of flags that did not come from the command line (a study file's): its complaint is raised
    as a UsageError instead of exiting the process."""
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.suppress(SystemExit):
        return parser.parse_args(list(flags))
    lines = err.getvalue().strip().splitlines() or ["not a list of flags"]
    raise UsageError(lines[-1].split("error: ", 1)[-1])


def share_cpu_threads(num_processes: int, threads: int | None = None) -> None:
    """Give this process `threads` torch threads, by default its share of the cores: processes that each spin all the
    cores slow one another down many times over (`accelerate launch` would otherwise leave one)."""
    torch.set_num_threads(threads or max(1, usable_cores() // num_processes))


def flag_message(err: FlatError, flags: dict[str, str] | None = None) -> str:
    """The first line of a library error, with the parameter it starts with shown as the script's flag: `--name`, or
    `flags[name]` where the flag is called otherwise."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if err.parameter and message.startswith(err.parameter):
        flag = (flags or {}).get(err.parameter, f"--{err.parameter}")
        return flag + message[len(err.parameter) :]
    return message


def run_main(
    main: Callable[[argparse.Namespace], None],
    args: argparse.Namespace,
    also_expected: tuple[type[Exception], ...] = (),
    flags: dict[str, str] | None = None,
) -> None:
    """Call `main(args)`; a FlatError (or an `also_expected` error) becomes one line on stderr, from the first process
    only when several run, and exit status 1, instead of a traceback.

    Args:
        main: the script's main function.
        args: its parsed arguments.
        also_expected: other errors that are the user's to fix (e.g. the Hub refusing a request).
        flags: library parameter -> the script's flag, where the flag is not `--parameter`.
    """
    try:
        main(args)
    except (FlatError, *also_expected) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            message = flag_message(err, flags) if isinstance(err, FlatError) else str(err).splitlines()[0]
            print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        sys.exit(1)
