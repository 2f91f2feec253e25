"""The run directory: what `train_flat_ddpm.py` writes, and the one place that knows its layout.

    output_dir/
      model_index.json, unet/, scheduler/   the trained weights, a DDPMPipeline (variant "raw")
      ema/, swa/                            the averaged weights, full DDPMPipelines (variants "ema", "swa")
      training_args.json                    the training record: every flag, resolved
      sample_grid.png, samples/             sample grids (also in ema/ and swa/)
      evaluation/                           the latest evaluation of each variant (also ema/evaluation/, ...)
      README.md                             the model card
      checkpoint-N/                         accelerate state (never pushed)
      logs/                                 trackers (never pushed)

Every module and script asks `RunDirectory` for these paths, and every file in it is written through
`write_atomically`, so a run killed at any moment leaves each entry either old or new, never half-written. Only the
standard library is imported: the Space and quantization read run directories without pulling in training code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers_flat.errors import FlatError

VARIANTS = ("raw", "ema", "swa")
_SUBDIRS = {"raw": "", "ema": "ema", "swa": "swa"}
TRAINING_RECORD = "training_args.json"
EVALUATION = "evaluation"
CARD = "README.md"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_STATE = "training_state.json"
# What goes to the Hub: pipelines, configs, card, record, evaluation results and plots. checkpoint-* (optimizer, RNG
# and scheduler state), logs/ (trackers) and samples/ (grids along the way) stay local.
_PUSHED_SUFFIXES = {".json", ".safetensors", ".md", ".png"}
_LOCAL_ONLY = ("checkpoint-", ".checkpoint-", "logs", "samples")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Replace the file or directory `path` in one step: `write(tmp)` fills a temporary sibling, which is then renamed
    over `path`. A crash before the rename leaves the old `path` as it was.

    Args:
        path: the file or directory to create or replace.
        write: called with the temporary path; must create a file or directory there.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> _ = write_atomically(target, lambda tmp: tmp.write_text("done"))
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    _remove(tmp)
    write(tmp)
    if path.is_dir():
        # A directory cannot be renamed over a non-empty one: move the old one aside first (a crash between the two
        # renames leaves no `path`, never a mixed one).
        old = path.with_name(f".{path.name}.old")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
    return path


def _remove(path: Path) -> None:
    if path.is_dir():
        # Renamed first, so that a kill during the deletion leaves nothing under a name that means "complete".
        doomed = path.with_name(f".{path.name}.deleting")
        if doomed.exists():
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_entry(path: str | os.PathLike) -> None:
    """Delete a file or directory so that no half-deleted directory ever keeps its name."""
    _remove(Path(path))


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write `data` as key-sorted JSON through `write_atomically`, indented by `indent` (None: one compact line, for
    the large records that are committed)."""
    separators = None if indent else (",", ":")
    text = json.dumps(data, indent=indent, separators=separators, sort_keys=True, default=str) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text))


@dataclass(frozen=True)
class DataSource:
    """Where a run's training images came from: a Hub or local dataset, an image folder, or (all None) the embedded
    digits."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    dataset_split: str = "train"
    train_subset: int | None = None  # the run trained on this many of the images (data.subset_indices)
    train_subset_seed: int = 0

    def replace(self, **overrides: str | int | None) -> DataSource:
        """A copy with each non-None override applied."""
        return DataSource(**{**self.__dict__, **{k: v for k, v in overrides.items() if v is not None}})


class RunDirectory:
    """A training run's output directory: its pipelines (variants "raw", "ema", "swa"), training record,
    evaluations, sample grids, card and checkpoints.

    Args:
        path: the output directory (it need not exist yet).

    Example:
        >>> import tempfile
        >>> run = RunDirectory(tempfile.mkdtemp())
        >>> run.variants(), run.holds_run(), run.pipeline_path("ema").name
        ([], False, 'ema')
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.resolve().name

    # Pipelines
    def pipeline_path(self, variant: str = "raw") -> Path:
        if variant not in _SUBDIRS:
            raise FlatError(f"variant {variant!r}: choose {', '.join(VARIANTS)}", parameter="variant")
        return self.path / _SUBDIRS[variant]

    def has_pipeline(self, variant: str = "raw") -> bool:
        path = self.pipeline_path(variant)
        return (path / "model_index.json").is_file() and (path / "unet").is_dir()

    def variants(self) -> list[str]:
        """The variants saved in the directory, raw first."""
        return [v for v in VARIANTS if self.has_pipeline(v)]

    def check_is_pipeline(self, parameter: str = "path", weights: bool = True) -> None:
        """A FlatError naming `parameter` unless the directory is a DDPMPipeline (`model_index.json`, and `unet/`
        with `weights`)."""
        if not ((self.path / "model_index.json").is_file() and (not weights or (self.path / "unet").is_dir())):
            needs = "model_index.json and unet/" if weights else "model_index.json"
            raise FlatError(f"{parameter} {self.path}: not a DDPMPipeline directory (no {needs})", parameter)

    def require_pipeline(self, variant: str = "raw", parameter: str = "path") -> Path:
        """The variant's pipeline directory; a FlatError naming `parameter` if the directory holds none."""
        self.check_is_pipeline(parameter)
        if not self.has_pipeline(variant):
            raise FlatError(
                f"variant {variant}: {self.path} was trained without use_{variant} (no {self.pipeline_path(variant)})",
                parameter="variant",
            )
        return self.pipeline_path(variant)

    # The training record
    @property
    def record_path(self) -> Path:
        return self.path / TRAINING_RECORD

    def record_file(self) -> Path | None:
        """The training record's file (`TrainingRecord.of` reads it), or None for a pipeline without one. The ema/ or
        swa/ pipeline of a run, opened as a directory of its own, has its run's record."""
        for path in (self.record_path, self.path.parent / TRAINING_RECORD):
            if path.is_file() and (path == self.record_path or self.path.name in _SUBDIRS.values()):
                return path
        return None

    def write_record(self, flags: dict[str, Any]) -> Path:
        return write_json(self.record_path, flags)

    def holds_run(self) -> bool:
        """Whether a training run has written here already (a record, a pipeline or a checkpoint)."""
        return self.record_path.exists() or (self.path / "model_index.json").exists() or bool(self.checkpoints())

    # Sample grids
    def samples_path(self, variant: str = "raw") -> Path:
        return self.pipeline_path(variant) / "samples"

    def sample_grid_path(self, variant: str = "raw") -> Path:
        return self.pipeline_path(variant) / "sample_grid.png"

    # Evaluations
    def evaluation_path(self, variant: str = "raw") -> Path:
        return self.pipeline_path(variant) / EVALUATION

    def read_evaluations(self) -> dict[str, dict]:
        """The latest published evaluation results of each variant, by variant."""
        found = {}
        for variant in VARIANTS:
            path = self.evaluation_path(variant) / "eval_results.json"
            if path.is_file():
                found[variant] = json.loads(path.read_text())
        return found

    def publish_evaluation(self, variant: str, source: str | os.PathLike) -> Path:
        """Copy an evaluation's output folder (results and plots) in as the variant's evaluation, replacing the
        previous one in one step."""
        return write_atomically(self.evaluation_path(variant), lambda tmp: shutil.copytree(source, tmp))

    # The model card
    @property
    def card_path(self) -> Path:
        return self.path / CARD

    # Checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.path / f"checkpoint-{step}"

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.path.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))
        ]
        return [p for _, p in sorted(found)]

    def resolve_checkpoint(self, checkpoint: str) -> Path | None:
        """The checkpoint directory `checkpoint` stands for: "latest" (None if there is none yet), a name in the
        directory, or a path."""
        available = self.checkpoints()
        if checkpoint == "latest":
            return available[-1] if available else None
        for candidate in (self.path / checkpoint, Path(checkpoint)):
            if (candidate / CHECKPOINT_STATE).is_file():
                return candidate
        have = ", ".join(p.name for p in available) or "none"
        raise FlatError(
            f"checkpoint: no checkpoint '{checkpoint}' in {self.path} (available: {have}; or use 'latest')",
            parameter="checkpoint",
        )

    # The Hub
    def files_to_push(self) -> list[str]:
        """The files that belong on the Hub, as sorted POSIX paths relative to the directory."""
        self.check_is_pipeline("output_dir", weights=False)
        chosen = []
        for path in self.path.rglob("*"):
            relative = path.relative_to(self.path)
            if not path.is_file() or path.suffix not in _PUSHED_SUFFIXES or ".partial" in str(relative):
                continue
            if any(
                part.startswith(_LOCAL_ONLY) or part.endswith((".old", ".deleting")) for part in relative.parts[:-1]
            ):
                continue
            chosen.append(relative.as_posix())
        return sorted(chosen)


def hub_download_patterns(variant: str = "raw") -> list[str]:
    """The files of a pushed run that serve one variant's pipeline and its evaluation plots: configs, safetensors
    weights and PNGs, never pickles or code."""
    prefix = f"{_SUBDIRS[variant]}/" if _SUBDIRS[variant] else ""
    return [
        f"{prefix}{p}"
        for p in (
            "model_index.json",
            "unet/config.json",
            "unet/*.safetensors",
            "scheduler/*.json",
            f"{EVALUATION}/*.png",
        )
    ]
