"""The run directory: atomic replacement of files and folders, its layout and what is pushed."""

import json

import pytest

from diffusers_flat.errors import FlatError
from diffusers_flat.run_directory import RunDirectory, write_atomically, write_json


def test_a_failed_write_leaves_the_old_file_and_folder_untouched(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"fid": 1.0})

    def dies_half_way(tmp):
        tmp.write_text('{"fid": 2')
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, dies_half_way)
    assert json.loads(target.read_text()) == {"fid": 1.0}
    # The debris is cleared by the next write of the same path.
    write_json(target, {"fid": 2.0})
    assert json.loads(target.read_text()) == {"fid": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    folder = tmp_path / "evaluation"
    write_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "a.txt").write_text("old")))

    def half_a_folder(tmp):
        tmp.mkdir()
        (tmp / "b.txt").write_text("new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(folder, half_a_folder)
    assert [p.name for p in folder.iterdir()] == ["a.txt"]
    write_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "b.txt").write_text("new")))
    assert [p.name for p in folder.iterdir()] == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation", "results.json"]


def fake_pipeline(path):
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text("{}")


def test_layout_variants_and_errors(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert run.variants() == [] and not run.holds_run()
    with pytest.raises(FlatError, match=r"^model_path .*run: not a DDPMPipeline directory") as info:
        run.require_pipeline("raw", parameter="model_path")
    assert info.value.parameter == "model_path"
    fake_pipeline(run.path)
    fake_pipeline(run.path / "swa")
    assert run.variants() == ["raw", "swa"] and run.holds_run()
    assert run.require_pipeline("swa") == run.path / "swa"
    with pytest.raises(FlatError, match="^variant ema: .* was trained without use_ema"):
        run.require_pipeline("ema")
    with pytest.raises(FlatError, match="^variant 'best': choose raw, ema, swa"):
        run.pipeline_path("best")
    assert run.evaluation_path("swa") == run.path / "swa" / "evaluation"
    assert run.sample_grid_path("raw") == run.path / "sample_grid.png"


def test_evaluations_are_published_whole_and_read_back_by_variant(tmp_path):
    run = RunDirectory(tmp_path / "run")
    fake_pipeline(run.path)
    fake_pipeline(run.path / "ema")
    report = tmp_path / "report"
    report.mkdir()
    (report / "eval_results.json").write_text(json.dumps({"loss": 0.5}))
    (report / "old_plot.png").write_bytes(b"png")
    run.publish_evaluation("ema", report)
    (report / "old_plot.png").unlink()
    (report / "eval_results.json").write_text(json.dumps({"loss": 0.25}))
    run.publish_evaluation("ema", report)
    assert run.read_evaluations() == {"ema": {"loss": 0.25}}
    assert sorted(p.name for p in run.evaluation_path("ema").iterdir()) == ["eval_results.json"]


def test_files_to_push_leave_local_state_behind(tmp_path):
    run = RunDirectory(tmp_path)
    fake_pipeline(tmp_path)
    for name in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "README.md",
        "training_args.json",
        "sample_grid.png",
        "evaluation/perturbation.png",
        "ema/evaluation/eval_results.json",
        "checkpoint-2/model.safetensors",
        "logs/events.json",
        "samples/step-1.png",
        "ema/samples/step-1.png",
        "unet/.config.json.partial",
        ".evaluation.old/plot.png",
        "notes.txt",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert run.files_to_push() == [
        "README.md",
        "ema/evaluation/eval_results.json",
        "evaluation/perturbation.png",
        "model_index.json",
        "sample_grid.png",
        "training_args.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
