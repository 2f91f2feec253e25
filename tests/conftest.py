import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_scripts" / "train_flat_ddpm.py"

# No outbound attempts, and caches inside the test session's temp space.
os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False")

# A UNet small enough for a training step in a few milliseconds: two levels, 8x8 images.
MICRO_UNET = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": None,
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    for var in ("HF_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR"):
        os.environ[var] = str(cache / var.lower())


@pytest.fixture(scope="session")
def micro_unet_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "micro_unet.json"
    path.write_text(json.dumps(MICRO_UNET))
    return path


def run_training(*args: str, launcher: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
    """Run train_flat_ddpm.py in a fresh process, as a user would."""
    command = [*launcher, str(SCRIPT), *args] if launcher else [sys.executable, str(SCRIPT), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def micro_args(output_dir: Path, config: Path, *extra: str) -> list[str]:
    """Flags for a seconds-long run of the micro UNet on the embedded digits at 8x8."""
    return [
        "--output_dir", str(output_dir), "--model_config_name_or_path", str(config), "--resolution", "8",
        "--train_batch_size", "8", "--eval_batch_size", "4", "--ddpm_num_inference_steps", "4",
        "--lr_warmup_steps", "0", "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip
