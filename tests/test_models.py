"""UNet presets and config files."""

import json

import pytest

from diffusers_flat.training.models import ModelConfigError, build_unet


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_ddpm_cifar10_preset_is_the_35_7m_network():
    unet = build_unet("ddpm-cifar10", 32, 3)
    assert round(parameters(unet) / 1e6, 1) == 35.7
    assert unet.config.sample_size == 32 and unet.config.in_channels == 3


def test_tiny_preset_follows_the_data_channels():
    assert round(parameters(build_unet("tiny", 16, 3)) / 1e6, 1) == 1.1
    gray = build_unet("tiny", 16, 1)
    assert gray.config.in_channels == gray.config.out_channels == 1


def test_config_file_and_directory(tmp_path):
    config = {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
        "in_channels": 3,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_file = build_unet(str(tmp_path / "config.json"), 8, 1)
    assert from_file.config.in_channels == 3  # the config decides; images get converted
    assert list(build_unet(str(tmp_path), 8, 3).config.block_out_channels) == [8, 16]


@pytest.mark.parametrize(
    ("name", "resolution", "message"),
    [
        ("tiny", 18, "resolution 18 does not fit this UNet: its 3 down blocks need a multiple of 4"),
        ("ddpm-cifar10", 4, "resolution 4 does not fit this UNet: its 4 down blocks need a multiple of 8"),
        ("nope", 16, "'nope' is neither a preset (tiny, ddpm-cifar10, adm-cifar10, adm-64)"),
    ],
)
def test_unusable_configs(name, resolution, message):
    with pytest.raises(ModelConfigError) as info:
        build_unet(name, resolution, 3)
    assert message in str(info.value)


def test_broken_config_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="is not valid JSON"):
        build_unet(str(tmp_path / "bad.json"), 8, 3)
    (tmp_path / "odd.json").write_text(json.dumps({"in_channels": 4, "out_channels": 4}))
    with pytest.raises(ModelConfigError, match="in_channels must be 1 .grayscale. or 3 .RGB."):
        build_unet(str(tmp_path / "odd.json"), 8, 3)
