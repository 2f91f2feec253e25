"""The figures of the evaluation: the paper's Fig. 1 (loss surface), Fig. 5 (loss under perturbation), Fig. 6
(exposure bias), FID against weight bits (Table 4 as a curve), and generated images beside their nearest training
images."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure  # figures without pyplot: no backend switch, no global state
from PIL import Image

from diffusers_flat.evaluation.levels import quantization_levels
from diffusers_flat.quantization import GRANULARITIES

if TYPE_CHECKING:  # the studies' plots read typed results; importing them here would pull in torch for every plot
    from diffusers_flat.evaluation.measurements import Measurements, Results


def _figure(figsize: tuple[float, float], rows: int = 1, cols: int = 1):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: str | os.PathLike) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_perturbation_curves(curves: dict[str, dict], path: str | os.PathLike) -> None:
    """Loss vs gamma, one line per model."""
    fig, ((ax,),) = _figure((5, 4))
    for name, curve in curves.items():
        ax.plot(curve["gamma"], curve["loss"], marker="o", label=name)
    ax.set_xlabel(r"perturbation radius $\gamma$ (random unit directions)")
    ax.set_ylabel("diffusion loss")
    ax.set_title("Loss under perturbation")
    ax.legend()
    _save(fig, path)


def plot_loss_surfaces(surfaces: dict[str, dict], path: str | os.PathLike) -> None:
    """Filled contours of each model's 2-D loss surface, side by side, on one colour scale."""
    fig, axes = _figure((4.2 * len(surfaces), 3.8), 1, len(surfaces))
    grids = [np.log10(np.asarray(s["loss"])) for s in surfaces.values()]
    levels = np.linspace(min(g.min() for g in grids), max(g.max() for g in grids), 21)
    for ax, (name, surface), grid in zip(axes[0], surfaces.items(), grids):
        axis = surface["axis"]
        filled = ax.contourf(axis, axis, grid, levels=levels, cmap="viridis")
        ax.contour(axis, axis, grid, levels=levels, colors="white", linewidths=0.4)
        ax.set_title(name)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    fig.colorbar(filled, ax=axes[0].tolist(), label="log10 loss")
    fig.savefig(path, dpi=120)


def plot_exposure_bias(results: dict[str, dict], path: str | os.PathLike) -> None:
    """Mean ||eps_theta|| per timestep on ground-truth inputs (dashed) and along the sampling chain (solid)."""
    fig, ((ax,),) = _figure((5.5, 4))
    for i, (name, r) in enumerate(results.items()):
        colour = f"C{i}"
        ax.plot(r["timesteps"], r["sampling_norm"], color=colour, label=f"{name}: sampling")
        ax.plot(r["timesteps"], r["training_norm"], color=colour, linestyle="--", label=f"{name}: training")
    ax.invert_xaxis()
    ax.set_xlabel("timestep t")
    ax.set_ylabel(r"mean $\|\epsilon_\theta(x_t, t)\|$")
    ax.set_title("Exposure bias")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_nearest_neighbours(generated: np.ndarray, training: np.ndarray, nearest: list[int], path, count=8) -> None:
    """Top row: generated images; bottom row: the nearest training image of each."""
    count = min(count, len(generated))
    fig, axes = _figure((1.2 * count, 2.6), 2, count)
    for j in range(count):
        for row, image in ((0, generated[j]), (1, training[nearest[j]])):
            axes[row][j].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
            axes[row][j].axis("off")
    axes[0][0].set_title("generated", fontsize=8, loc="left")
    axes[1][0].set_title("nearest training image", fontsize=8, loc="left")
    _save(fig, path)


def plot_fid_vs_bits(results: dict[str, dict], path: str | os.PathLike) -> None:
    """FID against weight bits (fp32 at the right), one line per model, step count and granularity: the paper's
    Table 4 as a curve, extended to fewer bits."""
    levels = {name: quantization_levels(r) for name, r in results.items()}
    bits = sorted({level["bits"] for q in levels.values() for level in q.values()})
    labels = [f"{b}-bit" for b in bits] + ["fp32"]
    fig, ((ax,),) = _figure((5.5, 4))
    line = 0
    for i, (name, r) in enumerate(results.items()):
        for granularity in sorted({level["granularity"] for level in levels[name].values()}, key=GRANULARITIES.index):
            for steps in r["fid"]:
                at = [levels[name].get(f"{b}:{granularity}", {}).get("fid", {}).get(steps, np.nan) for b in bits]
                ax.plot(
                    range(len(labels)),
                    [*at, r["fid"][steps]],
                    marker="os"[GRANULARITIES.index(granularity)],
                    color=f"C{i}",
                    linestyle=["-", "--", ":", "-."][line % 4],
                    label=f"{name}, {steps} steps, {granularity.replace('_', '-')}",
                )
                line += 1
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("weights")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID under weight quantization")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_sensitivity(results: dict[str, dict], path: str | os.PathLike) -> None:
    """The quantization-sensitivity curves: the fixed loss's increase, and the pixel displacement of the pipeline
    sampler's samples (solid; in results made before it, the PF-ODE's) and of ancestral ones (dotted), against bits
    (fewer to the right); one colour per model, one marker per granularity."""
    fig, ((loss_ax, moved_ax),) = _figure((10, 4), cols=2)
    samplers = set()
    for i, (name, r) in enumerate(results.items()):
        sampler = r["sensitivity"].get("sampler")
        samplers.add(f"{sampler.upper()} pipeline" if sampler else "PF-ODE")
        for granularity, curve in r["sensitivity"]["curves"].items():
            bits = sorted(curve, key=int, reverse=True)
            marker, label = ("o" if granularity == "per_tensor" else "s"), f"{name}, {granularity}"
            x = range(len(bits))
            loss_ax.plot(x, [curve[b]["loss_increase"] for b in bits], marker=marker, color=f"C{i}", label=label)
            measure = "displacement" if sampler else "ddim_displacement"
            moved_ax.plot(x, [curve[b][measure] for b in bits], marker=marker, color=f"C{i}", label=label)
            ancestral = [curve[b]["ancestral_displacement"] for b in bits]
            moved_ax.plot(x, ancestral, marker=marker, color=f"C{i}", linestyle=":", alpha=0.6)
            for ax in (loss_ax, moved_ax):
                ax.set_xticks(x, [f"{b}-bit" for b in bits])
    loss_ax.set_ylabel("L(quantized) - L(fp32)")
    loss_ax.set_title("fixed diffusion loss")
    moved_ax.set_ylabel("mean |pixel change| (0-255)")
    moved_ax.set_title(f"same noises: {' / '.join(sorted(samplers))} (solid), ancestral (dotted)", fontsize=9)
    loss_ax.legend(fontsize=7)
    _save(fig, path)


def plot_bands(results: Results, order: tuple[str, ...] | list[str], kind: str, path: str | os.PathLike) -> None:
    """A study's curves, one band (mean ± standard deviation over seeds) per row: the loss under perturbation
    against gamma (`kind="perturbation"`, the paper's Fig. 5) or the exposure-bias gap of the norms per timestep
    (`kind="exposure_bias"`, Fig. 6)."""
    fig, ((ax,),) = _figure((5.5, 4))
    for i, row in enumerate(r for r in order if r in results):
        runs = [getattr(r, kind) for r in results[row].values() if getattr(r, kind)]
        if not runs:
            continue
        x = runs[0]["gamma"] if kind == "perturbation" else runs[0]["timesteps"]
        y = np.asarray([r["loss"] if kind == "perturbation" else r["gap"] for r in runs])
        mean, std = y.mean(axis=0), (y.std(axis=0, ddof=1) if len(y) > 1 else np.zeros(y.shape[1]))
        ax.plot(x, mean, color=f"C{i}", label=f"{row} (n={len(y)})")
        ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    if kind == "perturbation":
        ax.set_xlabel(r"perturbation radius $\gamma$")
        ax.set_ylabel("diffusion loss")
        ax.set_title("Loss under perturbation (mean ± std over seeds)")
    else:
        ax.invert_xaxis()
        ax.set_xlabel("timestep t")
        ax.set_ylabel(r"sampling - training mean $\|\epsilon_\theta\|$")
        ax.set_title("Exposure-bias gap (mean ± std over seeds)")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_generalization(series: dict[str, dict[str, dict[int, list[float]]]], path: str | os.PathLike) -> None:
    """A generalization study's measures against the training-set size (log scale), one band (mean ± standard
    deviation over seeds) per row. `series`: measure title -> row -> subset size -> the seeds' values."""
    fig, axes = _figure((4.2 * len(series), 3.6), 1, len(series))
    for ax, (title, rows) in zip(axes[0], series.items()):
        for i, (row, by_size) in enumerate(rows.items()):
            sizes = sorted(size for size, values in by_size.items() if values)
            if not sizes:
                continue
            means = np.asarray([np.mean(by_size[size]) for size in sizes])
            stds = np.asarray([np.std(by_size[size], ddof=1) if len(by_size[size]) > 1 else 0.0 for size in sizes])
            ax.plot(sizes, means, marker="o", color=f"C{i}", label=row)
            ax.fill_between(sizes, means - stds, means + stds, color=f"C{i}", alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("training images")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_temperature_sweep(sweep: list[Measurements], measures: dict, path: str | os.PathLike) -> None:
    """The empirical denoiser's measures against its softmax temperature T (log scale); the noise-unconditional
    variant as a separate marker. `sweep`: its evaluations (each with `temperature` and `noise_unconditional`)."""
    fig, axes = _figure((4.2 * len(measures), 3.6), 1, len(measures))
    for ax, (title, measure) in zip(axes[0], measures.items()):
        for unconditional, style in ((False, "o-"), (True, "s")):
            points = sorted((r.temperature, measure(r)) for r in sweep if r.noise_unconditional == unconditional)
            if points:
                label = "noise-unconditional" if unconditional else "conditional on t"
                ax.plot(*zip(*points), style, color=f"C{int(unconditional)}", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("temperature T")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_study_sensitivity(results: Results, order: list[str], path: str | os.PathLike) -> None:
    """A study's quantization-sensitivity curves: the fixed loss's increase (symmetric-log scale: 8-bit weights can
    lower it) and the DDIM displacement against bits (fewer to the right), one panel per granularity, one line per
    row (the mean over seeds) with a band of ± one standard deviation."""
    curves = next(r.sensitivity.curves for seeds in results.values() for r in seeds.values() if r.sensitivity)
    granularities = sorted(curves, key=GRANULARITIES.index)
    measures = {"loss_increase": "fixed-loss increase", "ddim_displacement": "DDIM pixel displacement (0-255)"}
    fig, axes = _figure((4.6 * len(granularities), 7), len(measures), len(granularities))
    for col, granularity in enumerate(granularities):
        bits = sorted(curves[granularity], reverse=True)
        for row_index, (measure, label) in enumerate(measures.items()):
            ax = axes[row_index][col]
            for i, row in enumerate(order):
                runs = [r.sensitivity.curves[granularity] for r in results.get(row, {}).values() if r.sensitivity]
                if not runs:
                    continue
                y = np.asarray([[curve[b][measure] for b in bits] for curve in runs])
                mean, std = y.mean(axis=0), (y.std(axis=0, ddof=1) if len(y) > 1 else np.zeros(len(bits)))
                ax.plot(range(len(bits)), mean, marker="o", color=f"C{i}", label=f"{row} (n={len(y)})")
                ax.fill_between(range(len(bits)), mean - std, mean + std, color=f"C{i}", alpha=0.15)
            ax.set_xticks(range(len(bits)), [f"{b}-bit" for b in bits])
            ax.set_ylabel(label)
            ax.set_title(f"{granularity}: {label.split(' (')[0]}")
            if measure == "loss_increase":
                ax.set_yscale("symlog", linthresh=1e-4)
    axes[0][0].legend(fontsize=7)
    _save(fig, path)


def plot_flatness_during_training(results: Results, order: list[str], path: str | os.PathLike) -> None:
    """LPF estimated during training against steps (`--flatness_every`), one line per row (the mean over seeds) with
    a band of ± one standard deviation."""
    fig, ((ax,),) = _figure((6, 4))
    for i, row in enumerate(order):
        series = [r.flatness_series for r in results.get(row, {}).values() if r.flatness_series]
        if not series:
            continue
        steps = sorted(set.intersection(*({e["step"] for e in s} for s in series)))
        y = np.asarray([[next(e["lpf"] for e in s if e["step"] == step) for step in steps] for s in series])
        mean, std = y.mean(axis=0), (y.std(axis=0, ddof=1) if len(y) > 1 else np.zeros(len(steps)))
        ax.plot(steps, mean, color=f"C{i}", label=f"{row} (n={len(y)})")
        ax.fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LPF estimate (fixed triples and draws)")
    ax.set_title("Flatness during training")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_loss_curves(curves: dict[str, tuple[list[int], list[float]]], path: str | os.PathLike) -> None:
    """Training loss against steps, one line per run: a moving average of 50 steps over the raw loss."""
    fig, ((ax,),) = _figure((6, 4))
    for i, (name, (steps, losses)) in enumerate(curves.items()):
        window = min(50, len(losses))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color=f"C{i}", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average of 50)")
    ax.set_title("Training loss")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_kid_by_length(lengths: list[int], kid: list[float], threshold: float, path: str | os.PathLike) -> None:
    """A training-length pilot: KID x10³ after each length, and the rule's threshold."""
    fig, ((ax,),) = _figure((5, 3.5))
    ax.plot(lengths, kid, "o-", color="C0", label="KID after the stage")
    ax.axhline(threshold, color="C3", linestyle="--", label="the rule's threshold")
    ax.set_xscale("log")
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.set_xlabel("training steps")
    ax.set_ylabel("KID x10³")
    ax.set_title("KID against the training length")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_quantized_samples(
    panels: dict[str, tuple[Image.Image, Image.Image, float]], level: str, sampling: str, path: str | os.PathLike
) -> None:
    """The paper's Figure 2 kind: one row per model, its samples at fp32 beside the same noises' samples with
    quantized weights, the pixel displacement under the quantized panel. `panels`: label -> (fp32 grid, quantized
    grid, displacement); `sampling` says how they were drawn, e.g. "DDIM, 50 steps"."""
    fig, axes = _figure((6.4, 2.6 * len(panels) + 0.4), len(panels), 2)
    fig.set_layout_engine("constrained")  # tight_layout lets a tall figure's suptitle run into its first titles
    for (label, (fp32, quantized, moved)), (fp32_ax, quantized_ax) in zip(panels.items(), axes):
        for ax, grid, title in ((fp32_ax, fp32, f"{label}, fp32"), (quantized_ax, quantized, f"{label}, {level}")):
            ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        quantized_ax.set_xlabel(f"moved {moved:.1f} pixels (mean |change|, 0-255)", fontsize=9)
    fig.suptitle(f"The same noises, {sampling}", fontsize=10)
    _save(fig, path)
