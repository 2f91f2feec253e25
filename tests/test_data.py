"""Data loading through `datasets` (embedded digits, image folders, parquet, save_to_disk) and the sample stream."""

import logging
import random

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from diffusers_flat.data.images import DataError, ImageTransform, load_digits_dataset, load_image_dataset, open_image
from diffusers_flat.training.sample_stream import StepBatchSampler, TrainingImages


def test_embedded_digits_are_the_sklearn_digits():
    from sklearn.datasets import load_digits

    dataset = load_digits_dataset()
    assert len(dataset) == 1797 and dataset.column_names == ["image", "label"]
    reference = load_digits()
    for i in (0, 100, 1796):
        image = np.asarray(dataset[i]["image"])
        assert image.shape == (8, 8)
        np.testing.assert_allclose(image / 255 * 16, reference.images[i], atol=16 / 255)
        assert dataset[i]["label"] == reference.target[i]


def make_image_folder(root, sizes_and_modes):
    root.mkdir(parents=True, exist_ok=True)
    for i, (size, mode) in enumerate(sizes_and_modes):
        Image.new(mode, size, color=(200,) * len(mode) if mode != "L" else 200).save(root / f"img{i}.png")
    return root


def test_image_folder_with_mixed_modes_and_odd_sizes(tmp_path):
    folder = make_image_folder(
        tmp_path / "imgs", [((17, 9), "RGB"), ((5, 31), "RGBA"), ((12, 12), "L"), ((33, 33), "RGB")]
    )
    dataset, channels = load_image_dataset(train_data_dir=str(folder))
    assert len(dataset) == 4 and channels == 3
    images = TrainingImages(dataset, "image", ImageTransform(8, center_crop=False, random_flip=True, channels=3))
    for i in range(4):
        x = images[(i, 123)]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    gray = TrainingImages(dataset, "image", ImageTransform(8, center_crop=True, channels=1))
    assert gray[(0, 0)].shape == (1, 8, 8)


def test_channels_follow_the_images(tmp_path):
    gray = make_image_folder(tmp_path / "gray", [((8, 8), "L"), ((9, 7), "L")])
    assert load_image_dataset(train_data_dir=str(gray))[1] == 1
    mixed = make_image_folder(tmp_path / "mixed", [((8, 8), "L"), ((8, 8), "RGBA")])
    assert load_image_dataset(train_data_dir=str(mixed))[1] == 3
    assert load_image_dataset()[1] == 1  # the embedded digits


def test_transform_matches_hand_resize_and_scaling():
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    x = ImageTransform(16, center_crop=True, channels=3)(image, random.Random(0))
    expected = np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected / 127.5 - 1, atol=1e-6)


def test_random_flip_and_crop_follow_the_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 14, 3), dtype=np.uint8))
    transform = ImageTransform(8, random_flip=True)
    outs = {tuple(transform(image, random.Random(s)).flatten()[:5].tolist()) for s in range(20)}
    assert len(outs) > 1  # different seeds crop/flip differently
    assert torch.equal(transform(image, random.Random(3)), transform(image, random.Random(3)))


def test_parquet_directory_and_save_to_disk_load_through_dataset_name(tmp_path):
    digits = load_digits_dataset().select(range(20))
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    digits.to_parquet(str(parquet_dir / "train.parquet"))
    from_parquet, channels = load_image_dataset(dataset_name=str(parquet_dir))
    assert len(from_parquet) == 20 and channels == 1  # the digits are grayscale
    np.testing.assert_array_equal(np.asarray(open_image(from_parquet[3]["image"])), np.asarray(digits[3]["image"]))

    digits.save_to_disk(str(tmp_path / "saved"))
    assert len(load_image_dataset(dataset_name=str(tmp_path / "saved"))[0]) == 20


def test_corrupt_images_are_skipped_with_a_count(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "imgs", [((8, 8), "RGB")] * 3)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    png = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    with caplog.at_level(logging.WARNING):
        dataset, _ = load_image_dataset(train_data_dir=str(folder))
    assert len(dataset) == 3
    assert "skipped 2 unreadable images of 5" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset_name": "./no/such/dir"}, "dataset_name: path './no/such/dir' does not exist"),
        ({"train_data_dir": "/no/such/dir"}, "train_data_dir: '/no/such/dir' is not an existing directory"),
        ({"image_column": "img"}, "image_column 'img' is not in the dataset; its columns are: image, label"),
        ({"image_column": "label"}, "image_column 'label' holds"),
    ],
)
def test_bad_datasets_raise_one_line_errors(kwargs, message):
    with pytest.raises(DataError) as info:
        load_image_dataset(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_empty_and_all_corrupt_datasets(tmp_path):
    empty = Dataset.from_dict({"image": []}, features=Features({"image": ImageFeature()}))
    (tmp_path / "empty").mkdir()
    empty.to_parquet(str(tmp_path / "empty" / "train.parquet"))
    with pytest.raises(DataError, match="dataset_name: the dataset in .* is empty"):
        load_image_dataset(dataset_name=str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n junk")
    with pytest.raises(DataError, match="none of the dataset's 1 images can be read"):
        load_image_dataset(train_data_dir=str(tmp_path / "bad"))
    texts = Dataset.from_dict({"text": ["a"]}, features=Features({"text": Value("string")}))
    texts.save_to_disk(str(tmp_path / "texts"))
    with pytest.raises(DataError, match="its columns are: text"):
        load_image_dataset(dataset_name=str(tmp_path / "texts"))


def keys(sampler):
    return list(sampler)


def test_each_epoch_visits_every_image_once():
    sampler = StepBatchSampler(10, 5, seed=1, num_steps=4)  # 2 epochs of 10
    flat = [i for batch in keys(sampler) for i, _ in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled


def test_two_ranks_split_the_one_process_global_batch():
    one = keys(StepBatchSampler(37, 8, seed=0, num_steps=5))
    ranks = [keys(StepBatchSampler(37, 4, seed=0, num_steps=5, world_size=2, rank=r)) for r in range(2)]
    for step in range(5):
        assert ranks[0][step] + ranks[1][step] == one[step]


def test_accumulation_splits_the_large_batch():
    one = keys(StepBatchSampler(37, 12, seed=0, num_steps=3))
    accumulated = keys(StepBatchSampler(37, 4, seed=0, num_steps=3, accumulation_steps=3))
    for step in range(3):
        assert sum(accumulated[3 * step : 3 * step + 3], []) == one[step]


def test_resumed_sampler_continues_the_stream():
    full = keys(StepBatchSampler(23, 4, seed=2, num_steps=9, accumulation_steps=2))
    resumed = keys(StepBatchSampler(23, 4, seed=2, num_steps=9, start_step=5, accumulation_steps=2))
    assert resumed == full[10:]
