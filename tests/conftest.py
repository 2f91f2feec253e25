import json
import os
import random
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from helpers import MICRO_UNET, PooledPixels

from diffusers_flat.utils.seeding import sampling_generator

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_scripts" / "train_flat_ddpm.py"
# The scripts import as modules, so that bad input can be tested in this process through their cli(argv).
sys.path.insert(0, str(REPO / "training_scripts"))

# No outbound attempts, and caches inside the test session's temp space.
os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False")


def pin_xdist_worker() -> None:
    """Under pytest-xdist (`-n`, in the pytest configuration), pin worker gwK to core K (mod the cores) with one torch
    thread: the processes it starts inherit the pin, and every script takes its share of the cores from it
    (`share_cpu_threads`), so two workers never spin threads on one another's core (which slows both many times over).
    Most of the suite is single-threaded (interpreters starting, imports): two workers run it about twice as fast."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
    torch.set_num_threads(1)


pin_xdist_worker()


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    for var in ("HF_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR"):
        os.environ[var] = str(cache / var.lower())


def use_pooled_inception(monkeypatch) -> None:
    """InceptionV3 replaced by `PooledPixels` wherever the library builds it for an evaluation."""
    import diffusers_flat.evaluation.runs
    import diffusers_flat.studies.runner

    for module in (diffusers_flat.evaluation.runs, diffusers_flat.studies.runner):
        monkeypatch.setattr(module, "feature_network", lambda *args, **kwargs: PooledPixels())


@pytest.fixture
def pooled_inception(monkeypatch) -> None:
    """InceptionV3 replaced by `PooledPixels` for the test."""
    use_pooled_inception(monkeypatch)


@pytest.fixture(scope="session")
def micro_unet_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "micro_unet.json"
    path.write_text(json.dumps(MICRO_UNET))
    return path


TREE_MARKER = "DIFFUSERS_FLAT_TEST_TREE"


def kill_tree(marker: str) -> int:
    """Kill every process whose environment carries `marker`, however far down the tree and in whatever session:
    torch's elastic agent (behind `accelerate launch`) starts each worker in a session of its own, so killing the
    launcher's process group leaves the workers alive, holding the test's pipes open. Returns how many were killed."""
    killed = 0
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(TREE_MARKER) == marker:
                process.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return killed


def run_command(
    command: list[str], cwd: Path = REPO, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command with every wait bounded: on a time-out, the whole process tree is killed (found by a marker in
    the environment every descendant inherits) and the test fails with what the command printed so far. A descendant
    still alive after the command returned is killed too."""
    marker = uuid.uuid4().hex
    env = {**(os.environ if env is None else env), TREE_MARKER: marker}
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(marker)
        stdout, stderr = process.communicate(timeout=30)
        raise AssertionError(
            f"timed out after {timeout:.0f} s: {' '.join(command)}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-3000:]}"
        ) from None
    finally:
        kill_tree(marker)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_script(name: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """Run `training_scripts/<name>.py` with `args` in a fresh interpreter, as a user would (`run_command`'s
    keywords apply)."""
    return run_command([sys.executable, str(REPO / "training_scripts" / f"{name}.py"), *map(str, args)], **kwargs)


def launch_two_processes(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU: two real gloo ranks, bounded to 3 minutes."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        *args,
    ]
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


def train_here(*args: str) -> None:
    """The training script's own main, in this process: what a launch runs, less the seconds a fresh interpreter takes
    to import torch and diffusers (the launch itself is tested by the runs in fresh processes)."""
    import train_flat_ddpm

    train_flat_ddpm.main(train_flat_ddpm.parse_args(list(args)))


def micro_args(output_dir: Path, config: Path, *extra: str) -> list[str]:
    """Flags for a seconds-long run of the micro UNet on the embedded digits at 8x8."""
    return [
        "--output_dir",
        str(output_dir),
        "--model_config_name_or_path",
        str(config),
        "--resolution",
        "8",
        "--train_batch_size",
        "8",
        "--eval_batch_size",
        "4",
        "--ddpm_num_inference_steps",
        "4",
        "--lr_warmup_steps",
        "0",
        "--learning_rate",
        "1e-3",
        *extra,
    ]


def per_image_generators(count: int, seed: int = 0) -> list[torch.Generator]:
    """The documented sample stream: image i draws all its noise from its own generator (test_seeding.py checks the
    stream against SeedSequence by hand)."""
    return [sampling_generator(seed, i) for i in range(count)]


def run_cli(script, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script module's `cli(argv)` in this process, as its command line would: the exit status and stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.cli(list(map(str, argv)))
    return exit_info.value.code, capsys.readouterr().err


# The paper's nine rows (ADM, +EMA, +SWA, +IP, +IP+EMA, +IP+SWA, +SAM, +SAM+EMA, +SAM+SWA) come from three
# trainings with EMA and SWA on, as in the paper: each yields the raw, EMA and SWA pipelines. A fourth, plain run
# checks that averages are saved only when asked for. +SAM is also the run the averaging tests read (a checkpoint
# after each step, SWA from step 2 every 2 steps, EMA with a warm-up of power 0.75), and the plain run (a checkpoint
# after each step) the finished run that bad input must leave alone.
GRID = {
    "ADM": ["--use_ema", "--use_swa", "--swa_start", "0.5", "--swa_cycle", "1"],
    "+IP": ["--input_perturbation", "0.1", "--use_ema", "--use_swa", "--swa_start", "0.5", "--swa_cycle", "1"],
    "+SAM": ["--sam_rho", "0.05", "--use_ema", "--use_swa", "--swa_start", "2", "--swa_cycle", "2"]
    + ["--ema_power", "0.75", "--ema_inv_gamma", "1.0", "--checkpointing_steps", "1"],
    "plain": ["--checkpointing_steps", "1"],
}
GRID_STEPS = {"ADM": 4, "+IP": 4, "+SAM": 6, "plain": 2}


@pytest.fixture(scope="session")
def grid_runs(tmp_path_factory, micro_unet_config) -> dict[str, Path]:
    """The grid's micro runs (GRID), each trained once per session (in this process): tests read them, never write
    into them."""
    root = tmp_path_factory.mktemp("grid")
    runs = {}
    for name, flags in GRID.items():
        runs[name] = root / name.lstrip("+").lower()  # adm, ip, sam, plain
        train_here(*micro_args(runs[name], micro_unet_config, "--max_train_steps", str(GRID_STEPS[name]), *flags))
    return runs


@pytest.fixture(scope="session")
def two_models(grid_runs) -> tuple[Path, Path]:
    """The grid's ADM and +SAM runs (EMA and SWA kept, named adm and sam), shared by every test that evaluates or
    serves a model: a test that writes into one works on a copy."""
    return grid_runs["ADM"], grid_runs["+SAM"]
