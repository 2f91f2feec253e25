"""A training-length pilot: one run stopped at several lengths, each stage's pipeline evaluated, and a rule fixed
before the run that picks the study's length from the stages' KID and the study's projected cost. `run_pilot.py` is
its command line; the pilot file (YAML) names the training, the lengths, the evaluation and the rule's numbers:

    seed: 1
    training: [--dataset_name, fashion_mnist, --resolution, "16", --use_ema]
    lengths: [1500, 3000, 6000, 12000]
    variant: ema                             # the pipeline evaluated after each stage
    evaluation: [--metrics, fid, --sampler, ddim, --inference_steps, "50", --num_samples, "1000"]
    within: 0.15                             # L* = the shortest length whose KID <= (1 + within) x the longest's
    budget_hours: 8                          # the study's budget, projected from the pilot's rates
    seeds: 8                                 # the study's seeds per row
    step_ratios: {SAM-rho0.01: 2.04}         # the study's other rows' step time over a plain step
    evaluation_sets: {ema: 4, raw: 2}        # sets of `num_samples` each row's runs evaluate, per variant

Each stage resumes the last from its checkpoint (`--checkpointing_steps` must divide every length), so the stages
are points of one run when the learning rate does not depend on the total (a constant schedule after warm-up).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.arguments import parse_evaluation_flags
from diffusers_flat.evaluation.measurements import Measurements
from diffusers_flat.evaluation.plots import plot_kid_by_length
from diffusers_flat.evaluation.runs import evaluate_runs
from diffusers_flat.run_directory import RunDirectory, write_atomically, write_json
from diffusers_flat.training.arguments import parse_training_flags

KEYS = ("seed", "training", "lengths", "variant", "evaluation", "within", "budget_hours", "seeds", "step_ratios")
KEYS += ("evaluation_sets",)


@dataclass(frozen=True)
class Pilot:
    """A parsed pilot file (`Pilot.load`).

    Args:
        path: the pilot file.
        seed: the run's seed.
        training: the training script's flags, without --max_train_steps, --seed and --output_dir.
        lengths: the stages' lengths in steps, increasing; the last is the reference of the rule.
        variant: the pipeline evaluated after each stage (raw, ema or swa).
        evaluation: evaluate_flat.py flags of each stage's evaluation (it must measure fid).
        within: the rule's tolerance: L* is the shortest length whose KID is at most (1 + within) x the longest's.
        budget_hours: the study's budget.
        seeds: the study's seeds per row.
        step_ratios: each other row of the study -> its step time over a plain step.
        evaluation_sets: variant -> sets of `num_samples` each run of the study evaluates (fp32 and each level).

    Example:
        >>> pilot = Pilot(Path("p.yaml"), 1, (), (1500, 3000), "ema", (), 0.15, 8.0, 8, {"SAM": 2.0}, {"ema": 4})
        >>> pilot.pick({1500: 0.0230, 3000: 0.0200})  # 0.0230 <= 1.15 x 0.0200
        1500
    """

    path: Path
    seed: int
    training: tuple[str, ...]
    lengths: tuple[int, ...]
    variant: str
    evaluation: tuple[str, ...]
    within: float
    budget_hours: float
    seeds: int
    step_ratios: dict[str, float]
    evaluation_sets: dict[str, int]

    @classmethod
    def load(cls, path: str | Path) -> Pilot:
        """Read and check a pilot file; errors name the file and the key at fault."""
        path = Path(path)

        def fail(problem: str) -> FlatError:
            return FlatError(f"pilot {path}: {problem}", "pilot")

        if not path.is_file():
            raise fail("no file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise fail(f"not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict) or set(data) != set(KEYS):
            raise fail(f"must be a mapping with the keys {', '.join(KEYS)}")
        lengths = data["lengths"]
        if not isinstance(lengths, list) or len(lengths) < 2 or lengths != sorted(set(lengths)) or lengths[0] < 1:
            raise fail("lengths must be two or more increasing whole numbers of steps")
        for key in ("training", "evaluation"):
            if not isinstance(data[key], list):
                raise fail(f"{key} must be a list of flags")
        for flag in ("--max_train_steps", "--seed", "--output_dir"):
            if flag in map(str, data["training"]):
                raise fail(f"training sets {flag}: the pilot sets it")
        if not 0 < data["within"] < 1 or not data["budget_hours"] > 0 or not data["seeds"] >= 1:
            raise fail("within must be in (0, 1), budget_hours > 0 and seeds >= 1")
        pilot = cls(
            path,
            int(data["seed"]),
            tuple(map(str, data["training"])),
            tuple(lengths),
            str(data["variant"]),
            tuple(map(str, data["evaluation"])),
            float(data["within"]),
            float(data["budget_hours"]),
            int(data["seeds"]),
            {str(k): float(v) for k, v in data["step_ratios"].items()},
            {str(k): int(v) for k, v in data["evaluation_sets"].items()},
        )
        args = parse_training_flags([*pilot.training, "--max_train_steps", "1"])
        if args.checkpointing_steps is None or any(length % args.checkpointing_steps for length in lengths):
            raise fail("training's --checkpointing_steps must divide every length (each stage resumes the last)")
        if args.lr_scheduler not in ("constant", "constant_with_warmup"):
            raise fail(
                "training's --lr_scheduler must be constant or constant_with_warmup: a schedule that depends on the "
                "total makes each stage another run"
            )
        settings, _ = parse_evaluation_flags(pilot.evaluation)
        if "fid" not in settings.metrics:
            raise fail("evaluation must measure fid (--metrics): the rule reads KID")
        return pilot

    def pick(self, kid: dict[int, float]) -> int:
        """L*: the shortest length whose KID is at most (1 + within) x the longest length's."""
        reference = kid[self.lengths[-1]]
        return next(length for length in self.lengths if kid[length] <= (1 + self.within) * reference)

    def projection(self, length: int, steps_per_second: float, seconds_per_set: float) -> dict[str, float]:
        """The study's projected hours at `length`: its training (every row of every seed, at the plain step rate
        scaled by each row's step ratio) and its evaluation (every run's sets)."""
        rows = 1 + len(self.step_ratios)
        step_cost = 1 + sum(self.step_ratios.values())  # a plain row and the others, in plain steps
        training = self.seeds * length * step_cost / steps_per_second / 3600
        evaluation = self.seeds * rows * sum(self.evaluation_sets.values()) * seconds_per_set / 3600
        return {"training": training, "evaluation": evaluation, "total": training + evaluation}

    def decide(self, kid: dict[int, float], steps_per_second: float, seconds_per_set: float) -> dict:
        """The rule: L*, each length's projection, and the length the study takes with the reason."""
        chosen = self.pick(kid)
        hours = {length: self.projection(length, steps_per_second, seconds_per_set) for length in self.lengths}
        fits = [length for length in self.lengths if hours[length]["total"] <= self.budget_hours]
        if chosen in fits:
            length, reason = chosen, f"L* fits the {self.budget_hours:g}-hour budget"
        elif fits:
            length, reason = fits[-1], f"L* does not fit {self.budget_hours:g} h: the longest length that does"
        else:
            trains = [length for length in self.lengths if hours[length]["training"] <= self.budget_hours]
            if chosen in trains or not trains:
                length = chosen
            else:
                length = trains[-1]
            reason = (
                f"no length fits {self.budget_hours:g} h (the evaluation alone is projected at "
                f"{hours[chosen]['evaluation']:.1f} h): the budget applies to the training, "
                + ("which fits at L*" if length == chosen else "and this is the longest length whose training fits")
            )
        return {"L*": chosen, "hours": hours, "length": length, "reason": reason}


def stage_dir(out: Path, length: int) -> Path:
    """Where the evaluation after `length` steps is written."""
    return out / f"eval-{length}"


def run_pilot(pilot: Pilot, out: str | Path, train_script: Path) -> dict:
    """Train and evaluate each stage that is not finished (a stage interrupted in training resumes from its last
    checkpoint), keeping `pilot.json` in `out` up to date; returns its content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "pilot.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"pilot": str(pilot.path), "stages": {}}
    settings, options = parse_evaluation_flags(pilot.evaluation)
    run = RunDirectory(out / "run")
    for length in tqdm(pilot.lengths, desc="Pilot stages"):
        if str(length) in record["stages"]:
            continue
        checkpoints = run.checkpoints() if run.path.is_dir() else []
        start = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
        if start > length:
            raise FlatError(
                f"output_dir {out}: its run is past {length} steps; use a fresh --output_dir", "output_dir"
            )
        command = [sys.executable, "-m", "accelerate.commands.launch", str(train_script), *pilot.training]
        command += ["--seed", str(pilot.seed), "--max_train_steps", str(length), "--output_dir", str(run.path)]
        command += ["--resume_from_checkpoint", "latest"] if checkpoints else ["--overwrite_output_dir"]
        began = time.perf_counter()
        with open(out / "training.log", "a") as log:
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        if status != 0:
            raise FlatError(
                f"pilot: the training to {length} steps failed (exit {status}); see {out / 'training.log'}"
            )
        trained = time.perf_counter() - began
        began = time.perf_counter()
        target = stage_dir(out, length)
        results = evaluate_runs([run.path], pilot.variant, settings, target, cache_dir=out / "fid_cache", **options)
        evaluated = time.perf_counter() - began
        (result,) = map(Measurements.from_json, results.values())
        steps = result.first_steps
        record["stages"][str(length)] = {
            "steps_trained": length - start,
            "training_seconds": trained,
            "evaluation_seconds": evaluated,
            "kid": result.kid[steps]["mean"],
            "fid": result.fid[steps],
            "inference_steps": steps,
        }
        write_json(record_path, record)
    return record


def pilot_report(pilot: Pilot, record: dict, out: str | Path) -> str:
    """Apply the rule to a finished pilot and write report.md (and the decision into pilot.json); returns it. The
    plain step rate is the last stage's (the longest, uninterrupted by evaluation), the seconds per evaluation set the
    last stage's evaluation (its real images' statistics come from the cache the first stage wrote)."""
    out = Path(out)
    stages = {int(length): stage for length, stage in record["stages"].items()}
    missing = [length for length in pilot.lengths if length not in stages]
    if missing:
        raise FlatError(f"pilot: the stage of {missing[0]} steps has not finished; run the pilot again", "pilot")
    last = stages[pilot.lengths[-1]]
    rate = last["steps_trained"] / last["training_seconds"]
    per_set = last["evaluation_seconds"]
    decision = pilot.decide({length: stage["kid"] for length, stage in stages.items()}, rate, per_set)
    table = [
        "| steps | KID x10³ | FID | training (cumulative) | evaluation | within the rule |",
        "|---|---|---|---|---|---|",
    ]
    reference, cumulative = stages[pilot.lengths[-1]]["kid"], 0.0
    for length in pilot.lengths:
        stage = stages[length]
        cumulative += stage["training_seconds"]
        within = stage["kid"] <= (1 + pilot.within) * reference
        table.append(
            f"| {length} | {1e3 * stage['kid']:.2f} | {stage['fid']:.2f} | {cumulative / 60:.1f} min | "
            f"{stage['evaluation_seconds'] / 60:.1f} min | {'yes' if within else 'no'} |"
        )
    projection = ["| steps | training | evaluation | total |", "|---|---|---|---|"]
    for length, h in decision["hours"].items():
        projection.append(f"| {length} | {h['training']:.1f} h | {h['evaluation']:.1f} h | {h['total']:.1f} h |")
    lines = [
        "# Training-length pilot",
        f"Pilot file {pilot.path} (its rule was fixed before the run); seed {pilot.seed}; the {pilot.variant} "
        f"pipeline after each stage, evaluated with `{' '.join(pilot.evaluation)}`.",
        "\n".join(table),
        f"L* = **{decision['L*']}** steps: the shortest length whose KID is at most {1 + pilot.within:g} x the "
        f"{pilot.lengths[-1]}-step run's ({1e3 * (1 + pilot.within) * reference:.2f} x10³).",
        f"The study projected from these rates ({rate:.2f} plain steps/s, {per_set / 60:.1f} min per evaluation set; "
        f"{pilot.seeds} seeds, rows ADM and {', '.join(pilot.step_ratios)}):",
        "\n".join(projection),
        f"**The study takes {decision['length']} steps**: {decision['reason']}.",
    ]
    lines.append("![KID against the training length](kid_by_length.png)")
    plot_kid_by_length(
        list(pilot.lengths),
        [1e3 * stages[length]["kid"] for length in pilot.lengths],
        1e3 * (1 + pilot.within) * reference,
        out / "kid_by_length.png",
    )
    markdown = "\n\n".join(lines) + "\n"
    record["decision"] = {**decision, "steps_per_second": rate, "seconds_per_set": per_set}
    write_json(out / "pilot.json", record)
    write_atomically(out / "report.md", lambda tmp: tmp.write_text(markdown))
    return markdown
