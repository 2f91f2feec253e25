"""Fashion-MNIST offline: the idx reader against files written by hand here, the Hub's schema, the missing-files
error, the test split as FID's reference, and (with Debian's package installed, as CI installs it) a few training
steps and an evaluation on the real data."""

import gzip
import json
import struct

import numpy as np
import pytest
from conftest import micro_args, run_training
from datasets import ClassLabel, Features
from datasets import Image as ImageFeature
from PIL import Image

from diffusers_flat.data import fashion_mnist
from diffusers_flat.data.fashion_mnist import load_fashion_mnist, read_idx
from diffusers_flat.data.images import load_image_dataset, open_image
from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.run_directory import DataSource

HUB_NAMES = [
    "T - shirt / top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
REAL = fashion_mnist.local_files("train") is not None and fashion_mnist.local_files("test") is not None


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding, written out: 0, 0, type 0x08 (unsigned byte), the number of dimensions, each dimension as a
    big-endian int32, then the bytes in C order."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_split(directory, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    image_file, label_file = fashion_mnist.FILES[split]
    (directory / image_file).write_bytes(gzip.compress(idx_bytes(images)))
    (directory / label_file).write_bytes(gzip.compress(idx_bytes(labels)))


@pytest.fixture
def small_fashion(tmp_path, monkeypatch):
    """A 40-image train split and a 12-image test split of 28x28 noise in idx files, where the package's would be."""
    rng = np.random.default_rng(0)
    splits = {"train": 40, "test": 12}
    data = {
        s: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        for s, n in splits.items()
    }
    for split, (images, labels) in data.items():
        write_split(tmp_path, split, images, labels)
    monkeypatch.setattr(fashion_mnist, "DIRECTORY", tmp_path)
    return data


def test_the_idx_reader_reads_a_hand_written_file_plain_and_gzipped(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    plain = tmp_path / "a-idx3-ubyte"
    # magic 0x00000803, dims 2, 3, 4 (big-endian), then the 24 bytes
    plain.write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x04" + bytes(range(24)))
    np.testing.assert_array_equal(read_idx(plain), array)
    zipped = tmp_path / "a-idx3-ubyte.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(read_idx(zipped), array)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")  # floats, not bytes
    with pytest.raises(FlatError, match="not an idx file of unsigned bytes"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")  # says 5 values, holds 2
    with pytest.raises(FlatError, match=r"its header says \(5,\) \(5 bytes\), it holds 2"):
        read_idx(tmp_path / "short")


def test_the_loader_has_the_hub_schema_and_the_files_pixels(small_fashion):
    images, labels = small_fashion["test"]
    test = load_fashion_mnist("test")
    assert test.features == Features({"image": ImageFeature(), "label": ClassLabel(names=HUB_NAMES)})
    assert len(test) == 12 and test["label"] == labels.tolist()
    np.testing.assert_array_equal(np.asarray(test[5]["image"]), images[5])
    # through the training data path: `fashion_mnist` reads the local files, one channel
    train, channels = load_image_dataset("fashion_mnist")
    assert len(train) == 40 and channels == 1
    np.testing.assert_array_equal(np.asarray(open_image(train[7]["image"])), small_fashion["train"][0][7])
    with pytest.raises(FlatError, match="dataset_split must be one of train, test"):
        load_fashion_mnist("validation")


def test_missing_files_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DIRECTORY", tmp_path)
    with pytest.raises(FlatError, match="install them with apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train")
    # through the data path, offline: the Hub cannot be reached, and the error says how to get the files
    with pytest.raises(FlatError) as info:
        load_image_dataset("fashion_mnist")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message


def test_fid_compares_with_the_test_split_and_training_uses_the_train_split(small_fashion):
    real = load_real_images(DataSource(dataset_name="fashion_mnist", train_subset=16), 8, 1)
    # of the train split, only the 16 training images are prepared: FID never reads the others
    assert real.uint8.shape == (16, 8, 8, 1) and real.held_out.shape == (12, 8, 8, 1)
    # the test images as a model of 8x8 sees them: image 3 resized 28 -> 8 (bilinear) by PIL here
    resized = np.asarray(Image.fromarray(small_fashion["test"][0][3]).resize((8, 8), Image.Resampling.BILINEAR))
    assert np.abs(real.held_out[3, ..., 0].astype(int) - resized.astype(int)).max() <= 1  # rounding via [-1, 1]
    reference = real.fid_subset(12, seed=0)
    assert sorted(map(bytes, reference)) == sorted(map(bytes, real.held_out))  # all 12, none from the train split
    training = real.training_images()
    assert len(training.uint8) == 16 and training.held_out is real.held_out
    assert real.key["held_out"]


@pytest.mark.slow
@pytest.mark.skipif(not REAL, reason="needs Debian's dataset-fashion-mnist (the README's test command installs it)")
def test_a_few_steps_on_the_real_fashion_mnist_train_and_evaluate(tmp_path, micro_unet_config, pooled_inception):
    import evaluate_flat

    out = tmp_path / "fashion"
    flags = ["--dataset_name", "fashion_mnist", "--max_train_steps", "2", "--train_subset", "64"]
    result = run_training(*micro_args(out, micro_unet_config, *flags))
    assert "reading the local idx files" in result.stderr
    record = json.loads((out / "training_args.json").read_text())
    assert record["dataset_size"] == 64 and record["dataset_split"] == "train"
    argv = ["--model_path", str(out), "--metrics", "fid", "memorization", "--inference_steps", "2"]
    argv += ["--num_samples", "100", "--num_real", "100", "--output_dir", str(tmp_path / "eval")]
    evaluate_flat.main(evaluate_flat.parse_args(argv))
    result = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["fashion"]
    assert result["fid_num_real"] == 100 and np.isfinite(result["fid"]["2"])
    assert 0 <= result["memorization"]["memorization_ratio"] <= 1
