"""The package as users get it: light imports, and the wheel (not the editable tree) training, writing its model card
from the template it ships, and leaving a pipeline that plain diffusers loads."""

import json
import os
import shutil
import sys
import zipfile

import pytest
from conftest import REPO, run_command
from helpers import MICRO_UNET

MODULES_AFTER = """
import sys
{imports}
print(",".join(sorted({{name.split(".")[0] for name in sys.modules}})))
"""
HEAVY = {"datasets", "torchmetrics", "accelerate", "matplotlib", "scipy", "sklearn", "tensorboard", "pandas"}


def top_level_modules(imports: str) -> set[str]:
    result = run_command([sys.executable, "-c", MODULES_AFTER.format(imports=imports)], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.strip().splitlines()[-1].split(","))


def test_quantization_and_sampling_import_nothing_beyond_diffusers_and_torchao():
    """What the Space imports pulls in no more heavy packages than diffusers and torchao do by themselves."""
    baseline = top_level_modules("from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel\nimport torchao")
    ours = top_level_modules(
        "import diffusers_flat.quantization, diffusers_flat.sampling, diffusers_flat.run_directory, diffusers_flat"
    )
    assert (ours - baseline) & HEAVY == set(), sorted((ours - baseline) & HEAVY)
    assert "matplotlib" not in top_level_modules("import diffusers_flat.hub.model_card, diffusers_flat.hub.push")


def test_plots_leave_the_matplotlib_backend_alone():
    result = run_command(
        [
            sys.executable,
            "-c",
            "import matplotlib; matplotlib.use('svg'); import diffusers_flat.evaluation.plots; "
            "print(matplotlib.get_backend())",
        ],
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "svg", result.stderr[-2000:]


LOAD = """
import sys
from diffusers import DDPMPipeline
pipeline = DDPMPipeline.from_pretrained(sys.argv[1])
images = pipeline(batch_size=2, num_inference_steps=3, output_type="np").images
assert images.shape == (2, 8, 8, 1) and "diffusers_flat" not in sys.modules
print("loaded")
"""


@pytest.mark.slow
def test_the_installed_wheel_trains_and_writes_its_card(tmp_path):
    # Build from a copy of the sources, so that the checkout gets no build/ or egg-info.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    shutil.copytree(REPO / "diffusers_flat", source / "diffusers_flat", ignore=shutil.ignore_patterns("__pycache__"))
    build = run_command(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("diffusers_flat-*.whl")
    assert "diffusers_flat/hub/templates/model_card.md" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    install = run_command(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], timeout=300
    )
    assert install.returncode == 0, install.stderr[-3000:]

    # The script as a user copies it, run far from the checkout: diffusers_flat can only come from the wheel.
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(REPO / "training_scripts" / "train_flat_ddpm.py", work)
    (work / "micro.json").write_text(json.dumps(MICRO_UNET))
    env = dict(os.environ, PYTHONPATH=str(target))
    where = run_command(
        [sys.executable, "-c", "import diffusers_flat; print(diffusers_flat.__file__)"], work, 300, env
    )
    assert where.stdout.strip().startswith(str(target)), where.stdout
    train = run_command(
        [
            sys.executable,
            "train_flat_ddpm.py",
            "--output_dir",
            "run",
            "--model_config_name_or_path",
            "micro.json",
            "--resolution",
            "8",
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "4",
            "--eval_batch_size",
            "4",
            "--ddpm_num_inference_steps",
            "2",
        ],
        work,
        600,
        env,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    card = (work / "run" / "README.md").read_text()
    assert "library_name: diffusers" in card and "## Use it in plain diffusers" in card
    loaded = run_command([sys.executable, "-c", LOAD, str(work / "run")], work, 300, dict(os.environ))
    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-3000:]
