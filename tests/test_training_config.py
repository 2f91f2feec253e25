"""The training configuration written once: the script's flags are `TrainingConfig`'s fields (with its documented
meanings), `training_args.json` stores it, and `TrainingRecord` reads it back typed."""

import argparse
import dataclasses
import inspect

from diffusers_flat.run_directory import DataSource, RunDirectory
from diffusers_flat.training.arguments import parse_training_flags, training_parser
from diffusers_flat.training.config import CARD_CONFIGURATION, TrainingConfig, TrainingRecord, training_config


def fake_pipeline(path):
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text("{}")


def test_every_field_is_a_flag_with_its_type_default_and_documented_meaning():
    actions = {a.dest: a for a in training_parser()._actions if not isinstance(a, argparse._HelpAction)}
    fields = dataclasses.fields(TrainingConfig)
    assert list(actions) == [f.name for f in fields]
    doc = inspect.getdoc(TrainingConfig)
    for field in fields:
        action = actions[field.name]
        described = doc.split(f"\n    {field.name}: ", 1)[1].split("\n")[0]  # the Args line, read by hand
        assert action.help.startswith(described) and action.default == field.default, field.name
        assert isinstance(action, argparse._StoreTrueAction) == (field.type == "bool"), field.name
        assert action.choices == (list(field.metadata["choices"]) if "choices" in field.metadata else None)
    assert parse_training_flags([]) == TrainingConfig()
    config = parse_training_flags(["--sam_rho", "0.01", "--use_ema", "--train_subset", "32", "--asam_eta", "0"])
    assert (config.sam_rho, config.use_ema, config.train_subset, config.asam_eta) == (0.01, True, 32, 0.0)


def test_the_record_reads_back_the_typed_configuration_and_what_the_run_resolved(tmp_path):
    run = RunDirectory(tmp_path)
    recorded = {"sam_rho": 0.05, "sam_adaptive": True, "use_swa": True, "swa_cycle": 10, "dataset_name": "cifar10"}
    recorded |= {"image_column": "img", "seed": 3, "learning_rate": 1e-4, "swa_start_step": 90, "num_parameters": 7}
    run.write_record(recorded)
    record = TrainingRecord.of(run)
    flags = {k: v for k, v in recorded.items() if k not in ("swa_start_step", "num_parameters")}
    assert record.config == TrainingConfig(**flags)  # a flag the record lacks takes its default
    assert record.resolved == {"swa_start_step": 90, "num_parameters": 7}
    assert record.config.data == DataSource(dataset_name="cifar10", image_column="img")
    assert record.config.data.replace(image_column=None, train_data_dir="x") == DataSource("cifar10", None, "x", "img")
    listed = dict(record.configuration())
    assert [key for key in listed] == [key for key in CARD_CONFIGURATION if key in listed]
    assert (listed["sam_rho"], listed["swa_start_step"], listed["num_parameters"], listed["seed"]) == (0.05, 90, 7, 3)
    # written back, the record is the same; the Hub token is never written
    assert TrainingRecord.from_json(record.to_json()) == record
    assert "hub_token" not in TrainingRecord(TrainingConfig(hub_token="hf_secret")).to_json()
    # the ema/ pipeline opened on its own reads its run's record; a pipeline trained elsewhere has none
    fake_pipeline(tmp_path / "ema")
    assert training_config(RunDirectory(tmp_path / "ema")).seed == 3
    fake_pipeline(tmp_path / "elsewhere")
    assert TrainingRecord.of(RunDirectory(tmp_path / "elsewhere")) is None
    assert training_config(RunDirectory(tmp_path / "elsewhere")) == TrainingConfig()
