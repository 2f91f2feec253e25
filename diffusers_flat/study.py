"""A flatness study: the paper's grid over several seeds, read from a YAML study file.

Three trainings per seed (ADM, +IP, +SAM), each with EMA and SWA on, give the nine rows of the paper's Table 2: the
raw, EMA and SWA pipelines of each run. The study file names the seeds, the methods' flags, the flags every training
shares (after an optional recipe file) and the evaluation's flags:

    seeds: [1, 2, 3]
    methods: {ADM: [], IP: [--input_perturbation, "0.1"], SAM: [--sam_rho, "0.1"]}
    recipe: recipes/paper-cifar10.txt      # optional
    training: [--max_train_steps, "855"]
    evaluation: [--num_samples, "300", --quantize, "8", "6", "4"]

Standard library and PyYAML only: checking a study file loads no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import FlatError

METHODS = ("ADM", "IP", "SAM")
VARIANT_ROWS = {"raw": "", "ema": "+EMA", "swa": "+SWA"}
KEYS = ("seeds", "methods", "recipe", "training", "evaluation")


class StudyError(FlatError):
    """A study file that cannot be run."""


def row_name(method: str, variant: str) -> str:
    """The paper's row of a method's variant: ADM/raw -> "ADM", IP/ema -> "+IP+EMA", SAM/swa -> "+SAM+SWA"."""
    base = "" if method == "ADM" else f"+{method}"
    return (base + VARIANT_ROWS[variant]) or "ADM"


@dataclass(frozen=True)
class Run:
    """One training of the study: a method at a seed."""

    method: str
    seed: int
    flags: tuple[str, ...]  # the training script's flags, output dir excluded

    @property
    def name(self) -> str:
        return f"{self.method.lower()}-seed{self.seed}"


@dataclass(frozen=True)
class Study:
    """A parsed study file (`Study.load`).

    Args:
        path: the study file.
        seeds: the seeds, each run once per method.
        methods: method -> its own training flags.
        recipe: a flags file every training reads first, or None.
        training: flags every training gets (after the recipe).
        evaluation: evaluate_flat.py flags for every variant of every run.

    Example:
        >>> study = Study(Path("s.yaml"), (1, 2), {"ADM": (), "SAM": ("--sam_rho", "0.1")})
        >>> [run.name for run in study.runs()]
        ['adm-seed1', 'sam-seed1', 'adm-seed2', 'sam-seed2']
    """

    path: Path
    seeds: tuple[int, ...]
    methods: dict[str, tuple[str, ...]]
    recipe: Path | None = None
    training: tuple[str, ...] = ()
    evaluation: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def load(cls, path: str | Path) -> Study:
        """Read and check a study file; errors name the file and the key at fault."""
        path = Path(path)
        if not path.is_file():
            raise StudyError(f"study {path}: no file", "study")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise StudyError(f"study {path}: not valid YAML ({str(err).splitlines()[0]})", "study") from None
        if not isinstance(data, dict):
            raise StudyError(f"study {path}: must be a mapping with keys {', '.join(KEYS)}", "study")
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise StudyError(f"study {path}: unknown key {unknown[0]}; the keys are {', '.join(KEYS)}", "study")
        seeds = data.get("seeds")
        if not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds):
            raise StudyError(f"study {path}: seeds must be a list of whole numbers >= 0", "study")
        if len(set(seeds)) != len(seeds):
            repeated = next(s for s in seeds if seeds.count(s) > 1)
            raise StudyError(f"study {path}: seed {repeated} is repeated", "study")
        methods = data.get("methods")
        if not isinstance(methods, dict) or not methods:
            raise StudyError(f"study {path}: methods must map {', '.join(METHODS)} to their flags", "study")
        for method, flags in methods.items():
            if method not in METHODS:
                raise StudyError(f"study {path}: unknown method {method}; choose from {', '.join(METHODS)}", "study")
            _check_flags(path, f"methods.{method}", flags)
        for key in ("training", "evaluation"):
            _check_flags(path, key, data.get(key) or [])
        recipe = data.get("recipe")
        if recipe is not None:
            # relative to where the study runs (the checkout), as a flags file on the command line would be
            recipe = Path(recipe)
            if not recipe.is_file():
                raise StudyError(f"study {path}: recipe {recipe} is not a file", "study")
        return cls(
            path,
            tuple(seeds),
            {m: tuple(map(str, f or [])) for m, f in methods.items()},
            recipe,
            tuple(map(str, data.get("training") or [])),
            tuple(map(str, data.get("evaluation") or [])),
        )

    def runs(self) -> list[Run]:
        """Every training, seed by seed, methods in the file's order."""
        common = ((f"@{self.recipe}",) if self.recipe else ()) + self.training
        return [
            Run(method, seed, (*common, *flags, "--use_ema", "--use_swa", "--seed", str(seed)))
            for seed in self.seeds
            for method, flags in self.methods.items()
        ]


def _check_flags(path: Path, key: str, flags) -> None:
    if not isinstance(flags, list) or not all(isinstance(f, (str, int, float)) for f in flags):
        raise StudyError(f"study {path}: {key} must be a list of flags and values", "study")


def parse_shard(shard: str) -> tuple[int, int]:
    """ "I/N" -> (I, N), 1 <= I <= N."""
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise StudyError(f"shard {shard!r}: write I/N, e.g. 2/4", "shard") from None
    if not 1 <= index <= count:
        raise StudyError(f"shard {shard}: I must be from 1 to N", "shard")
    return index, count


def shard_of(runs: list[Run], index: int, count: int) -> list[Run]:
    """Every `count`-th run from the `index`-th (1-based): the shards 1..N partition the runs."""
    return runs[index - 1 :: count]
