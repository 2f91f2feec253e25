"""Flatness during training: every N steps a cheap LPF estimate of the model being trained, on one fixed small set of
(x0, t, eps) triples and the same LPF draws all run long, so that the series moves only as the weights do. Logged to
the tracker (TensorBoard scalars `flatness/...`) and written to `<output_dir>/flatness.json` for the study report."""

from __future__ import annotations

import json

import torch
from diffusers import DDPMScheduler

from diffusers_flat.metrics.flatness import DiffusionLoss, lpf_flatness
from diffusers_flat.run_directory import RunDirectory, write_json

FLATNESS_LOG = "flatness.json"


class FlatnessLog:
    """The series of LPF estimates of one training run.

    Args:
        run: the run directory; `flatness.json` goes there (a resumed run keeps the entries up to its start).
        scheduler: the training's noise scheduler.
        images: the fixed images of the triples, (N, C, H, W) in [-1, 1].
        draws: LPF's draws per estimate (a few: an estimate, not the evaluation's LPF).
        sigma: LPF's noise scale.
        seed: the triples' and the draws' seed.
        start_step: the step training starts from (0, or the resumed checkpoint's).

    Example:
        >>> import tempfile
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> log = FlatnessLog(RunDirectory(tempfile.mkdtemp()), DDPMScheduler(), torch.zeros(4, 1, 8, 8), draws=2)
        >>> sorted(log.measure(unet, step=100))
        ['flatness/loss', 'flatness/lpf', 'flatness/sharpness_excess']
    """

    def __init__(
        self,
        run: RunDirectory,
        scheduler: DDPMScheduler,
        images: torch.Tensor,
        draws: int = 8,
        sigma: float = 0.01,
        seed: int = 0,
        start_step: int = 0,
    ):
        self.path = run.path / FLATNESS_LOG
        self.loss = DiffusionLoss(scheduler, images, seed=seed, batch_size=len(images))
        self.draws, self.sigma, self.seed = draws, sigma, seed
        earlier = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.series = [entry for entry in earlier if entry["step"] <= start_step]

    def measure(self, unet: torch.nn.Module, step: int, sam_sharpness: float | None = None) -> dict[str, float]:
        """Estimate LPF and the loss of `unet` (left unchanged) at `step`, add them to the series and its file, and
        return them as tracker scalars."""
        lpf = lpf_flatness(unet, self.loss, self.sigma, self.draws, self.seed, show_progress=False)
        loss = self.loss(unet)
        entry = {"step": step, "lpf": lpf["lpf"], "lpf_stderr": lpf["stderr"], "loss": loss}
        scalars = {"flatness/lpf": lpf["lpf"], "flatness/loss": loss, "flatness/sharpness_excess": lpf["lpf"] - loss}
        if sam_sharpness is not None:  # SAM's own L(w + e) - L(w) on this step's batch
            entry["sam_sharpness"] = sam_sharpness
        self.series.append(entry)
        write_json(self.path, self.series)
        return scalars
