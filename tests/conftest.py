import json
import os
import random
import signal
import socket
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


def run_command(command: list[str], cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on a time-out, kill the whole group, since launchers leave their
    workers behind otherwise."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launch_two_processes(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU: two real gloo ranks, bounded to 3 minutes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), *args]  # fmt: skip
    return run_command(command, cwd=cwd, timeout=180)


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range, where gloo's own connections land."""
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def run_training(*args: str, two_processes: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    """Run train_flat_ddpm.py in fresh processes, as a user would."""
    if two_processes:
        result = launch_two_processes(str(SCRIPT), *args)
    else:
        result = run_command([sys.executable, str(SCRIPT), *args])
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
