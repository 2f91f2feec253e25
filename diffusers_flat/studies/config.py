"""A flatness study: the paper's grid over several seeds, read from a YAML study file.

Three trainings per seed (ADM, +IP, +SAM), each with EMA and SWA on, give the nine rows of the paper's Table 2: the
raw, EMA and SWA pipelines of each run. The study file names the seeds, the methods' flags, the flags every training
shares (after an optional recipe file) and the evaluation's flags. A method may appear more than once under labels
METHOD-TAG, e.g. SAM-rho0.01 and SAM-rho0.001 (rows +SAM-rho0.01, +SAM-rho0.001+EMA, ...):

    seeds: [1, 2, 3]
    methods: {ADM: [], IP: [--input_perturbation, "0.1"], SAM: [--sam_rho, "0.1"]}
    recipe: recipes/paper-cifar10.txt      # optional
    training: [--max_train_steps, "855"]
    evaluation: [--num_samples, "300", --quantize, "8", "6", "4"]
    tuning:                                # optional: one flag of one method, tuned on its own seed first
      method: SAM
      flag: --sam_rho
      values: ["0.1", "0.01", "0.001"]
      seed: 0                              # not a seed of the grid: tuning runs never enter the claims
      select: {metric: kid, inference_steps: 20, variant: raw}   # the lowest wins, fixed before any run
      baseline: ADM                        # optional: also train this method at the tuning seed, for reference
      evaluation: [--metrics, fid, --inference_steps, "20"]
    variants: [raw]                        # optional: the pipelines evaluated (default raw, ema, swa)
    generalization:                        # optional: training-set size as an axis (not with tuning)
      subsets: [32, 128, 512, 1797]        # nested random subsets (--train_subset), each method x seed on each
      teacher: {method: ADM, seed: 0}      # trained on all the data: E_gen = PFD(student, teacher)
      teacher_training: [--max_train_steps, "855"]
      teacher_evaluation: [--metrics, pfd, --pfd_noises, "200"]   # the runner adds --pfd_reference the teacher
      empirical_subset: 128                # the empirical denoiser of these images, at each temperature
      temperatures: [1, 100, 10000]
      empirical_evaluation: [--metrics, fid, memorization]
      noise_unconditional: true            # also its noise-unconditional variant, and a --noise_unconditional UNet
    reuse:                                 # optional: finished runs of another study with the same flags
      study: studies/fashion-mnist.yaml
      report: docs/study-fashion-mnist/report.json   # its report, which holds every run's evaluation
      runs: {ADM: [2, 3]}                  # method -> seeds read from the report instead of trained again
    fraction_kept:                         # optional: what fraction of one method's effect (against ADM) the others
      of: SAM-rho0.01                      # keep, on LPF and on the quantization damage at one ladder level
      granularity: per_channel
      bits: 3
    variant_evaluation: {raw: [--quantize, "4:per_channel"]}   # optional: a variant's own evaluation flags
    primary: {measure: kid_increase, base: ADM, treated: SAM, variant: ema, level: "4:per_channel"}
    family:                                # the secondary claims, Holm-corrected together; a list in treated or
      - {measure: kid, base: ADM, treated: [IP, SAM], variant: ema}          # level stands for one claim each
    exploratory: []                        # claims reported uncorrected, as exploratory
    figure: {rows: [ADM, SAM], variant: ema, level: "4:per_channel", seeds: [1, 2], sampler: ddim, steps: 50,
             noises: 8}                    # the picture: each seed's rows, fp32 beside the level, the same noises
    resources: {num_cpus: 4, num_gpus: 1}  # optional: each task's share of a Ray cluster (--executor ray)

A study without primary and family is one family of every claim its report pre-registers (the paper's or each
comparison's), corrected together. Checking a study file loads no model.
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path

import yaml

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.measurements import Measurements, Results, read_results
from diffusers_flat.studies.claims import MEASURES, SECONDARY, Claim, declared_claim
from diffusers_flat.studies.schema import STUDY, SchemaError, check

METHODS = ("ADM", "IP", "SAM")
VARIANT_ROWS = {"raw": "", "ema": "+EMA", "swa": "+SWA"}
UNTUNED = "TUNED"  # stands for the tuned value in the flags of runs listed before the tuning has finished


class StudyError(FlatError):
    """A study file that cannot be run."""


def method_of(label: str) -> str:
    """The method of a study's method label: "SAM-rho0.01" -> "SAM", "ADM" -> "ADM"."""
    return label.split("-", 1)[0]


def row_name(method: str, variant: str) -> str:
    """The paper's row of a method's variant: ADM/raw -> "ADM", IP/ema -> "+IP+EMA", SAM/swa -> "+SAM+SWA",
    SAM-rho0.01/ema -> "+SAM-rho0.01+EMA"."""
    base = "" if method == "ADM" else f"+{method}"
    return (base + VARIANT_ROWS[variant]) or "ADM"


@dataclass(frozen=True)
class Run:
    """One training of the study: a method at a seed."""

    method: str
    seed: int
    flags: tuple[str, ...]  # the training script's flags, output dir excluded
    tag: str = ""  # a tuning run's value, e.g. "rho0.01"

    @property
    def name(self) -> str:
        return f"{self.method.lower()}{'-' + self.tag if self.tag else ''}-seed{self.seed}"


@dataclass(frozen=True)
class Tuning:
    """One flag of one method tuned on a seed of its own before the grid, as the paper tuned rho.

    Args:
        method: the tuned method; its grid runs take the selected value.
        flag: the training flag tuned, e.g. "--sam_rho".
        values: the candidates, e.g. ("0.1", "0.01", "0.001").
        seed: the tuning seed, never one of the grid's: the tuning runs stay out of the claims.
        metric: "fid" or "kid"; the lowest wins (ties: the first listed).
        inference_steps: the T' of the metric.
        variant: the pipeline the metric is read from (raw, ema or swa).
        baseline: a method also trained at the tuning seed as the table's reference, or None.
        evaluation: evaluate_flat.py flags of the tuning evaluations.

    Example:
        >>> tuning = Tuning("SAM", "--sam_rho", ("0.1", "0.01"), 0, "kid", 20, "raw")
        >>> tuning.select({"0.1": 0.03, "0.01": 0.02})
        '0.01'
    """

    method: str
    flag: str
    values: tuple[str, ...]
    seed: int
    metric: str
    inference_steps: int
    variant: str
    baseline: str | None = None
    evaluation: tuple[str, ...] = ()

    def tag(self, value: str) -> str:
        """ "--sam_rho", "0.01" -> "rho0.01": the run name's mark of a tuning value."""
        return f"{self.flag.lstrip('-').split('_')[-1]}{value}"

    def score(self, result: Measurements) -> float:
        """The selection metric of one evaluation's measurements."""
        score = getattr(result, self.metric)[self.inference_steps]
        return score["mean"] if self.metric == "kid" else score

    def select(self, scores: dict[str, float]) -> str:
        """The value with the lowest score; ties go to the first listed."""
        return min(self.values, key=lambda value: scores[value])


@dataclass(frozen=True)
class Generalization:
    """Training-set size as the study's axis (arXiv 2505.20123's teacher-student protocol; SPEC section 5).

    Every method and seed is trained on nested random subsets of the data (`--train_subset`); a teacher trained on
    all of it gives E_gen = PFD(student, teacher) (`teacher_evaluation` flags, plus `--pfd_reference` the teacher),
    the study's evaluation flags give E_mem = PFD(student, the empirical denoiser of its subset) with the
    memorization ratio and KID. The empirical denoiser of `empirical_subset` images is evaluated at each temperature.

    Args:
        subsets: the training-set sizes, each from 2 to the dataset's size, none repeated.
        teacher_method: the teacher's method (one of the study's).
        teacher_seed: the teacher's seed, not one of the grid's.
        teacher_training: flags the teacher gets after the study's training flags (e.g. more steps).
        teacher_evaluation: evaluate_flat.py flags of the E_gen evaluation.
        empirical_subset: the subset whose empirical denoiser is swept over `temperatures`.
        temperatures: softmax temperatures T > 0 of the sweep.
        empirical_evaluation: evaluate_flat.py flags of the sweep's evaluations.
        noise_unconditional: also train the teacher's method blind to the noise level (`--noise_unconditional`) on
            `empirical_subset` at the teacher seed, and evaluate the empirical denoiser's noise-unconditional variant.

    Example:
        >>> g = Generalization((32, 128), "ADM", 0, empirical_subset=32, temperatures=(1.0, 100.0))
        >>> g.tag(32)
        'n32'
    """

    subsets: tuple[int, ...]
    teacher_method: str
    teacher_seed: int
    teacher_training: tuple[str, ...] = ()
    teacher_evaluation: tuple[str, ...] = ()
    empirical_subset: int | None = None
    temperatures: tuple[float, ...] = ()
    empirical_evaluation: tuple[str, ...] = ()
    noise_unconditional: bool = False

    @staticmethod
    def tag(subset: int) -> str:
        return f"n{subset}"


@dataclass(frozen=True)
class Reuse:
    """Finished runs of another study, read from its report instead of trained again. Training is deterministic, so
    the same method at the same seed with the same training and evaluation flags (checked when the study file loads)
    is the same run. The study's first seed is always trained here: the report's figure and training curves read
    its runs, and the report compares them with the other study's (the check that the reuse reproduces).

    Args:
        study: the other study's file.
        report: the other study's report.json, which holds every run's evaluation results.
        runs: method -> the seeds read from the report.
        results: the report's evaluation results, row -> seed -> result (read once, when the study file loads).

    Example:
        >>> reuse = Reuse(Path("other.yaml"), Path("report.json"), {"ADM": (2, 3)}, {})
        >>> reuse.covers(Run("ADM", 2, ())), reuse.covers(Run("ADM", 1, ()))
        (True, False)
    """

    study: Path
    report: Path
    runs: dict[str, tuple[int, ...]]
    results: Results

    def covers(self, run: Run) -> bool:
        """Whether `run` is one of the reused runs (never a tuning or teacher run)."""
        return not run.tag and run.seed in self.runs.get(run.method, ())


@dataclass(frozen=True)
class FractionKept:
    """What fraction of one method's effect relative to ADM each other method keeps (cheap SAM modes against full
    SAM): on LPF, and on the quantization damage (fixed-loss increase and DDIM displacement, as log ratios) at one
    level of the evaluation's ladder (`fraction_kept` in claims.py).

    Args:
        of: the method whose effect is the whole, e.g. "SAM-rho0.01".
        granularity: the ladder level's scales, per_tensor or per_channel.
        bits: the ladder level's bits.

    Example:
        >>> FractionKept("SAM-rho0.01", "per_channel", 3).level
        '3-bit per_channel'
    """

    of: str
    granularity: str
    bits: int

    @property
    def level(self) -> str:
        return f"{self.bits}-bit {self.granularity}"

    def others(self, methods) -> list[str]:
        """The methods measured against `of`: all but ADM and `of`."""
        return [m for m in methods if m not in ("ADM", self.of)]


@dataclass(frozen=True)
class ClaimSpec:
    """A claim a study file declares: `measure` (a name of claims.MEASURES) of `treated` against `base`, both methods
    of the study, in one variant's pipelines, at a quantized level ("B:granularity"; None: fp32) and T' (None: the
    evaluation's first).

    Example:
        >>> ClaimSpec("kid_increase", "ADM", "SAM", "ema", "4:per_channel").rows
        ('+EMA', '+SAM+EMA')
    """

    measure: str
    base: str
    treated: str
    variant: str
    level: str | None = None
    steps: int | None = None

    @property
    def rows(self) -> tuple[str, str]:
        return row_name(self.base, self.variant), row_name(self.treated, self.variant)

    def claim(self, role: str = SECONDARY) -> Claim:
        return declared_claim(self.measure, *self.rows, self.level, self.steps, role)


@dataclass(frozen=True)
class FigureSpec:
    """A study's picture, named in its file before any run: for each seed, each row's samples from the same `noises`
    noises at fp32 and at `level`, drawn by the pipeline `sampler` in `steps` steps.

    Example:
        >>> FigureSpec(("ADM", "SAM"), "ema", "4:per_channel", (1, 2)).noises
        8
    """

    rows: tuple[str, ...]
    variant: str
    level: str
    seeds: tuple[int, ...]
    sampler: str = "ddim"
    steps: int = 50
    noises: int = 8


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
        tuning: a flag tuned before the grid, or None.
        variants: the pipelines of each run that are evaluated (raw, ema, swa; default all three).
        generalization: training-set size as an axis of the grid, or None.
        reuse: runs of the grid read from another study's report, or None.
        fraction_kept: the fraction of one method's effect each other method keeps, reported; or None.
        variant_evaluation: variant -> evaluate_flat.py flags used for that variant instead of `evaluation`.
        primary: the primary endpoint, tested alone, or None (then every claim is one family).
        family: the secondary claims, corrected together by Holm's procedure.
        exploratory: claims reported without correction, as exploratory.
        figure: the study's picture, or None.
        resources: the Ray resources of each task under `--executor ray` (num_cpus, num_gpus), or None: a node's.

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
    tuning: Tuning | None = None
    variants: tuple[str, ...] = tuple(VARIANT_ROWS)
    generalization: Generalization | None = None
    reuse: Reuse | None = None
    fraction_kept: FractionKept | None = None
    variant_evaluation: dict[str, tuple[str, ...]] = field(default_factory=dict)
    primary: ClaimSpec | None = None
    family: tuple[ClaimSpec, ...] = ()
    exploratory: tuple[ClaimSpec, ...] = ()
    figure: FigureSpec | None = None
    resources: dict[str, float] | None = None

    def evaluation_of(self, variant: str) -> tuple[str, ...]:
        """The evaluation flags of `variant`'s pipelines."""
        return self.variant_evaluation.get(variant, self.evaluation)

    def declared_claims(self) -> list[Claim]:
        """The primary endpoint, the family and the exploratory claims, in that order, each with its role."""
        if self.primary is None:
            return []
        return [
            self.primary.claim("primary"),
            *(spec.claim("secondary") for spec in self.family),
            *(spec.claim("exploratory") for spec in self.exploratory),
        ]

    @classmethod
    def load(cls, path: str | Path) -> Study:
        """Read and check a study file against the schema (schema.py), then what refers to the rest of it; errors
        name the file and the key at fault."""
        path = Path(path)
        if not path.is_file():
            raise StudyError(f"study {path}: no file", "study")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise StudyError(f"study {path}: not valid YAML ({str(err).splitlines()[0]})", "study") from None
        try:
            check(data, STUDY)
        except SchemaError as err:
            raise StudyError(f"study {path}: {err}", "study") from None

        def fail(problem: str) -> StudyError:
            return StudyError(f"study {path}: {problem}", "study")

        for method in data["methods"]:
            if not isinstance(method, str) or method_of(method) not in METHODS:
                raise fail(
                    f"unknown method {method}; choose from {', '.join(METHODS)} (or METHOD-TAG, e.g. SAM-rho0.01)"
                )
        recipe = data.get("recipe")
        if recipe is not None:
            # relative to where the study runs (the checkout), as a flags file on the command line would be
            recipe = Path(recipe)
            if not recipe.is_file():
                raise fail(f"recipe {recipe} is not a file")
        seeds = tuple(data["seeds"])
        methods = {m: _flags(f) for m, f in data["methods"].items()}
        training = _flags(data.get("training"))
        tuning = _tuning(data.get("tuning"), seeds, methods, training, fail)
        generalization = _generalization(data.get("generalization"), seeds, methods, training, fail)
        if generalization and tuning:
            raise fail("tuning and generalization cannot be combined; tune in a study of its own")
        variants = tuple(data.get("variants") or VARIANT_ROWS)
        evaluation = _flags(data.get("evaluation"))
        study = cls(path, seeds, methods, recipe, training, evaluation, tuning, variants, generalization)
        fraction = _fraction_kept(data.get("fraction_kept"), methods, fail)
        study = replace(study, reuse=_reuse(study, data.get("reuse"), fail), fraction_kept=fraction)
        return replace(study, resources=data.get("resources"), **_declarations(study, data, fail))

    def _run(self, method: str, seed: int, extra: tuple[str, ...] = (), tag: str = "") -> Run:
        common = ((f"@{self.recipe}",) if self.recipe else ()) + self.training
        averages = tuple(f"--use_{v}" for v in ("ema", "swa") if v in self.variants)  # what the evaluation reads
        flags = (*common, *self.methods[method], *extra, *averages, "--seed", str(seed))
        return Run(method, seed, flags, tag)

    def runs(self, tuned: str | None = None) -> list[Run]:
        """Every training of the grid, seed by seed, methods in the file's order. The tuned method's runs take
        `tuning.flag tuned` (UNTUNED stands for the value while the tuning has not finished)."""
        runs = []
        g = self.generalization
        for seed in self.seeds:
            for subset in g.subsets if g else [None]:
                for method in self.methods:
                    if subset is not None:
                        runs.append(self._run(method, seed, ("--train_subset", str(subset)), g.tag(subset)))
                        continue
                    tuned_flag = self.tuning and method == self.tuning.method
                    runs.append(self._run(method, seed, (self.tuning.flag, tuned or UNTUNED) if tuned_flag else ()))
        return runs

    def to_train(self, tuned: str | None = None) -> list[Run]:
        """The grid's runs this study trains itself: `runs(tuned)` less those it reuses."""
        return [run for run in self.runs(tuned) if not (self.reuse and self.reuse.covers(run))]

    def teacher_runs(self) -> list[Run]:
        """A generalization study's teacher (all the data), then the noise-unconditional student if asked for."""
        g = self.generalization
        if g is None:
            return []
        runs = [self._run(g.teacher_method, g.teacher_seed, g.teacher_training, "teacher")]
        if g.noise_unconditional:
            flags = ("--noise_unconditional", "--train_subset", str(g.empirical_subset))
            runs.append(self._run(g.teacher_method, g.teacher_seed, flags, f"nu-{g.tag(g.empirical_subset)}"))
        return runs

    def tuning_runs(self) -> list[Run]:
        """The tuning's trainings: each value of the tuned flag at the tuning seed, then the baseline if any."""
        if self.tuning is None:
            return []
        t = self.tuning
        runs = [self._run(t.method, t.seed, (t.flag, value), t.tag(value)) for value in t.values]
        return runs + ([self._run(t.baseline, t.seed)] if t.baseline else [])


@dataclass(frozen=True)
class Work:
    """What a study (or a shard of it) costs, in the units `benchmarks/study_cost.py` measures rates in.

    Args:
        plain_steps: optimizer steps of one forward-backward pass (ADM, IP).
        sam_steps: SAM's optimizer steps (two passes each).
        unet_image_forwards: evaluation UNet forwards, one image each (sampling steps and loss terms).
        inception_images: generated images through InceptionV3.

    Example:
        >>> work = Work(plain_steps=3600, sam_steps=0, unet_image_forwards=0, inception_images=0)
        >>> rates = {"device": "cpu", "plain_steps_per_s": 2.0, "sam_steps_per_s": 1.0,
        ...          "unet_image_forwards_per_s": 1.0, "inception_images_per_s": 1.0}
        >>> work.projection(rates).endswith("= 0.5 h")
        True
    """

    plain_steps: int
    sam_steps: int
    unet_image_forwards: int
    inception_images: int

    def describe(self) -> str:
        return (
            f"work: {self.plain_steps:,} training steps and {self.sam_steps:,} SAM steps (two passes each); "
            f"{self.unet_image_forwards:,} UNet image-forwards of evaluation (sampling steps and loss terms) and "
            f"{self.inception_images:,} generated images through InceptionV3, plus the real ones once"
        )

    def __add__(self, other: Work) -> Work:
        return Work(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other))))

    def seconds(self, rates: dict) -> tuple[float, float]:
        """The (training, evaluation) seconds this work takes at `rates` (the JSON `benchmarks/study_cost.py`
        writes)."""
        training = self.plain_steps / rates["plain_steps_per_s"] + self.sam_steps / rates["sam_steps_per_s"]
        sampling = self.unet_image_forwards / rates["unet_image_forwards_per_s"]
        return training, sampling + self.inception_images / rates["inception_images_per_s"]

    def projection(self, rates: dict) -> str:
        """The hours this work takes at `rates`, training and evaluation."""
        hours = [seconds / 3600 for seconds in self.seconds(rates)]
        return (
            f"projected on {rates['device']}: training {hours[0]:.1f} h ({self.plain_steps:,} steps at "
            f"{rates['plain_steps_per_s']:.3g} /s, {self.sam_steps:,} SAM steps at {rates['sam_steps_per_s']:.3g} /s) "
            f"+ evaluation {hours[1]:.1f} h ({self.unet_image_forwards:,} UNet image-forwards at "
            f"{rates['unet_image_forwards_per_s']:.3g} /s, {self.inception_images:,} InceptionV3 images at "
            f"{rates['inception_images_per_s']:.3g} /s) = {sum(hours):.1f} h"
        )


def _flags(flags: list | None) -> tuple[str, ...]:
    return tuple(map(str, flags or []))


def _tuning(data: dict | None, seeds, methods: dict, training: tuple[str, ...], fail) -> Tuning | None:
    if data is None:
        return None
    method, flag, baseline, select = data["method"], data["flag"], data.get("baseline"), data["select"]
    if method not in methods:
        raise fail(f"tuning.method must be one of the study's methods ({', '.join(methods)}), got {method}")
    if flag in methods[method] or flag in training:
        raise fail(f"tuning.flag {flag} is also set in the study's training or methods.{method}: set it in one place")
    if data["seed"] in seeds:
        raise fail(f"tuning.seed must be a whole number >= 0 that is not one of the study's seeds, got {data['seed']}")
    if baseline is not None and (baseline not in methods or baseline == method):
        raise fail(f"tuning.baseline must be another of the study's methods, got {baseline}")
    values = _flags(data["values"])
    metric, steps, variant = select["metric"], select["inference_steps"], select["variant"]
    return Tuning(method, flag, values, data["seed"], metric, steps, variant, baseline, _flags(data.get("evaluation")))


def _generalization(data: dict | None, seeds, methods: dict, training: tuple[str, ...], fail) -> Generalization | None:
    if data is None:
        return None
    subsets, teacher = data["subsets"], data["teacher"]
    if "--train_subset" in training or any("--train_subset" in flags for flags in methods.values()):
        raise fail("generalization.subsets set --train_subset: leave it out of training and methods")
    if teacher["method"] not in methods:
        choices = ", ".join(methods)
        raise fail(f"generalization.teacher must be {{method: one of {choices}, seed: a seed not in the grid}}")
    if teacher["seed"] in seeds:
        raise fail(
            "generalization.teacher.seed must be a whole number >= 0 that is not one of the study's seeds, got "
            f"{teacher['seed']}"
        )
    empirical_subset, temperatures = data.get("empirical_subset"), data.get("temperatures") or []
    if empirical_subset is not None and empirical_subset not in subsets:
        raise fail(
            f"generalization.empirical_subset must be one of subsets ({', '.join(map(str, subsets))}), got "
            f"{empirical_subset}"
        )
    if (empirical_subset is None) != (not temperatures) or (data.get("noise_unconditional") and not temperatures):
        raise fail("generalization.empirical_subset and temperatures come together (noise_unconditional needs both)")
    return Generalization(
        tuple(subsets),
        teacher["method"],
        teacher["seed"],
        _flags(data.get("teacher_training")),
        _flags(data.get("teacher_evaluation")),
        empirical_subset,
        tuple(float(t) for t in temperatures),
        _flags(data.get("empirical_evaluation")),
        bool(data.get("noise_unconditional")),
    )


def _reuse(study: Study, data: dict | None, fail) -> Reuse | None:
    if data is None:
        return None
    other = Study.load(data["study"])  # relative to the checkout, as the recipe
    report, runs = Path(data["report"]), data["runs"]
    if other.evaluation != study.evaluation:
        raise fail(f"reuse.study {other.path} evaluates with other flags: reused runs are evaluated as this study's")
    for method, seeds in runs.items():
        if method not in study.methods or method not in other.methods:
            raise fail(f"reuse.runs: {method} must be a method of both this study and {other.path}")
        if study.tuning and method == study.tuning.method:
            raise fail(f"reuse.runs: {method} takes the value tuned here, which {other.path} did not tune")
        if not set(seeds) <= set(study.seeds) & set(other.seeds):
            raise fail(f"reuse.runs.{method} must list seeds of both this study and {other.path}")
        if study.seeds[0] in seeds:
            first = study.seeds[0]
            raise fail(f"reuse.runs.{method}: seed {first} is the first seed, trained here to check the reuse")
        for seed in seeds:
            if study._run(method, seed).flags != other._run(method, seed).flags:
                raise fail(f"reuse.runs.{method}: {other.path} trains seed {seed} with other flags than this study")
    try:
        recorded = json.loads(report.read_text())
        settings, results = recorded["settings"], recorded["results"]
    except (OSError, ValueError, KeyError, TypeError):
        raise fail(f"reuse.report {report} is not the report.json of a finished study") from None
    if Path(settings.get("study", "")) != other.path or settings.get("evaluation") != list(study.evaluation):
        raise fail(f"reuse.report {report} is not {other.path}'s report with this study's evaluation flags")
    for method, seeds in runs.items():
        for variant in study.variants:
            row = row_name(method, variant)
            missing = [seed for seed in seeds if str(seed) not in results.get(row, {})]
            if missing:
                raise fail(f"reuse.report {report} has no result of row {row} at seed {missing[0]}")
    return Reuse(other.path, report, {method: tuple(seeds) for method, seeds in runs.items()}, read_results(results))


def _fraction_kept(data: dict | None, methods: dict, fail) -> FractionKept | None:
    if data is None:
        return None
    fraction = FractionKept(data["of"], data["granularity"], data["bits"])
    if "ADM" not in methods or fraction.of not in methods or not fraction.others(methods):
        raise fail(
            "fraction_kept.of must be a method of the study other than ADM, with ADM and at least one more method "
            f"beside it, got {fraction.of}"
        )
    return fraction


def _declarations(study: Study, data: dict, fail) -> dict:
    """variant_evaluation, primary, family, exploratory and figure, checked against the study's methods, variants
    and seeds (that each level and T' is evaluated is checked against the parsed flags by the plan)."""
    by_variant = data.get("variant_evaluation") or {}
    if not set(by_variant) <= set(study.variants):
        raise fail(f"variant_evaluation must map variants of the study ({', '.join(study.variants)}) to flags")
    declared = {"variant_evaluation": {v: _flags(flags) for v, flags in by_variant.items()}}
    if data.get("primary") is None and (data.get("family") or data.get("exploratory")):
        raise fail("family and exploratory claims need a primary endpoint: name one under primary")
    if data.get("primary") is not None:
        primary = _claim_specs(study, "primary", data["primary"], fail)
        if len(primary) != 1:
            raise fail("primary must be one claim: a single treated method and level")
        declared["primary"] = primary[0]
        for key in ("family", "exploratory"):
            items = enumerate(data.get(key) or [])
            declared[key] = tuple(spec for i, item in items for spec in _claim_specs(study, f"{key}[{i}]", item, fail))
        every = [declared["primary"], *declared["family"], *declared["exploratory"]]
        repeated = next((spec for i, spec in enumerate(every) if spec in every[:i]), None)
        if repeated:
            where = f"{repeated.variant}{', ' + repeated.level if repeated.level else ''}"
            raise fail(f"the claim {repeated.measure} of {repeated.treated} ({where}) is declared twice")
    figure = data.get("figure")
    if figure is not None:
        if not set(figure["rows"]) <= set(study.methods):
            raise fail(f"figure.rows must list methods of the study ({', '.join(study.methods)})")
        if figure["variant"] not in study.variants:
            raise fail(
                f"figure.variant must be one of the study's variants ({', '.join(study.variants)}), got "
                f"{figure['variant']}"
            )
        if not set(figure["seeds"]) <= set(study.seeds):
            raise fail(f"figure.seeds must list seeds of the study ({', '.join(map(str, study.seeds))})")
        declared["figure"] = FigureSpec(
            tuple(figure["rows"]),
            figure["variant"],
            str(figure["level"]),
            tuple(figure["seeds"]),
            figure.get("sampler", "ddim"),
            figure.get("steps", 50),
            figure.get("noises", 8),
        )
    return declared


def _claim_specs(study: Study, key: str, item: dict, fail) -> tuple[ClaimSpec, ...]:
    """One declared claim, or one per treated method and level where those are lists."""
    measure = MEASURES.get(item["measure"])
    if measure is None:
        raise fail(f"{key}.measure must be one of {', '.join(MEASURES)}, got {item['measure']}")
    treated = item["treated"] if isinstance(item["treated"], list) else [item["treated"]]
    levels = item.get("level") if isinstance(item.get("level"), list) else [item.get("level")]
    for method in [item["base"], *treated]:
        if method not in study.methods:
            choices = ", ".join(study.methods)
            raise fail(f"{key}.base and treated must be methods of the study ({choices}), got {method}")
    if item["base"] in treated:
        raise fail(f"{key}.treated must differ from base {item['base']}")
    if item["variant"] not in study.variants:
        raise fail(
            f"{key}.variant must be one of the study's variants ({', '.join(study.variants)}), got {item['variant']}"
        )
    for level in levels:
        if level is None and measure.level == "required":
            example = '"4:per_channel"'
            raise fail(f"{key}.level: {item['measure']} is measured at a quantized level; name it, e.g. {example}")
        if level is not None and measure.level == "none":
            raise fail(f"{key}.level: {item['measure']} has no quantized level; leave level out")
    return tuple(
        ClaimSpec(item["measure"], item["base"], method, item["variant"], level, item.get("steps"))
        for level in levels
        for method in treated
    )


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
