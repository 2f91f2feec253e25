"""Image datasets, for training, evaluation and studies alike: the embedded digits, any dataset `datasets` loads (Hub
id, local files, a `save_to_disk` folder, an image folder), Debian's Fashion-MNIST, the nested training subsets and
the torchvision-free image transform.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image

from diffusers_flat.data import fashion_mnist
from diffusers_flat.errors import FlatError

logger = logging.getLogger(__name__)


class DataError(FlatError):
    """A dataset that cannot be trained on, with a message that names the parameter or file."""


def load_digits_dataset() -> Dataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits as a `datasets.Dataset` with `image` and `label` columns."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16 (ink is high): spread them over 0..255.
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = [Image.fromarray(p, mode="L") for p in pixels]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    return Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    cache_dir: str | None = None,
    split: str = "train",
) -> tuple[Dataset, int]:
    """A split of an image dataset (the training split by default), with unreadable images dropped (a warning counts
    them), and its channel count: 1 if every image is grayscale, else 3.

    `dataset_name` is a Hub id, a local dataset directory (files `datasets` understands, or a `save_to_disk`
    folder); `train_data_dir` is an image folder. With neither, the embedded digits. `fashion_mnist` reads the idx
    files of Debian's `dataset-fashion-mnist` when they are installed (else it is the Hub dataset of that name). The
    image column is returned undecoded (`{"bytes", "path"}`): `open_image` decodes it.
    """
    from_arrays = dataset_name == fashion_mnist.NAME and fashion_mnist.local_files(split) is not None
    if from_arrays:
        logger.info(f"dataset_name {dataset_name}: reading the local idx files in {fashion_mnist.DIRECTORY}")
        dataset = fashion_mnist.load_fashion_mnist(split)
    elif dataset_name:
        path = Path(dataset_name).expanduser()
        if path.exists():
            dataset = _load_local(path, dataset_config_name, cache_dir, "dataset_name", split)
        elif _looks_like_path(dataset_name):
            raise DataError(f"dataset_name: path '{dataset_name}' does not exist", parameter="dataset_name")
        else:
            try:
                dataset = load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
            except Exception as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                if dataset_name == fashion_mnist.NAME:  # offline, the local files are the way
                    reason += f"; offline, install its files with apt-get install {fashion_mnist.PACKAGE}"
                raise DataError(
                    f"dataset_name '{dataset_name}' is not a local path and could not be loaded from the Hub: "
                    f"{reason}",
                    parameter="dataset_name",
                ) from None
    elif train_data_dir:
        path = Path(train_data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"train_data_dir: '{train_data_dir}' is not an existing directory", "train_data_dir")
        if not any(p.is_file() for p in path.rglob("*")):
            raise DataError(f"train_data_dir: '{train_data_dir}' holds no image files", "train_data_dir")
        dataset = _load_local(path, None, cache_dir, "train_data_dir", split, builder="imagefolder")
    elif split != "train":
        raise DataError(f"dataset_split: the embedded digits have only a train split, not {split!r}", "dataset_split")
    else:
        dataset = load_digits_dataset()

    if image_column not in dataset.column_names:
        raise DataError(
            f"image_column '{image_column}' is not in the dataset; its columns are: {', '.join(dataset.column_names)}",
            parameter="image_column",
        )
    if not isinstance(dataset.features[image_column], ImageFeature):
        raise DataError(
            f"image_column '{image_column}' holds {dataset.features[image_column]}, not images",
            parameter="image_column",
        )
    if len(dataset) == 0:
        raise DataError("the dataset is empty: it has no training images")
    dataset = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    if from_arrays:  # encoded here from uint8 arrays, not read from files: every image is readable and grayscale
        return dataset, 1
    return _drop_unreadable(dataset, image_column)


def _load_local(
    path: Path, config: str | None, cache_dir: str | None, parameter: str, split: str, builder: str | None = None
) -> Dataset:
    """A split of a local dataset: a `save_to_disk` folder, files `datasets` understands, or an image folder
    (`builder`). Errors name `parameter`, the argument that gave the path."""
    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            dataset = load_from_disk(str(path))
            if isinstance(dataset, DatasetDict):
                if split not in dataset:
                    raise DataError(
                        f"{parameter}: '{path}' has no '{split}' split (it has {', '.join(dataset)})", parameter
                    )
                dataset = dataset[split]
            return dataset
        if builder:
            return load_dataset(builder, data_dir=str(path), split=split, cache_dir=cache_dir)
        return load_dataset(str(path), config, split=split, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "corresponds to no data" in reason:  # how `datasets` reports a split without rows
            raise DataError(
                f"{parameter}: the dataset in '{path}' is empty: it has no training images", parameter
            ) from None
        raise DataError(f"{parameter}: cannot load a dataset from '{path}': {reason}", parameter) from None


def open_image(record: dict) -> Image.Image:
    """Decode one undecoded `datasets` image record (`{"bytes", "path"}`)."""
    source = io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"]
    image = Image.open(source)
    image.load()
    return image


GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _image_modes(records: list[dict]) -> dict[str, list]:
    modes = []
    for record in records:
        try:
            modes.append(open_image(record).mode)
        except Exception:
            modes.append(None)
    return {"_mode": modes}


def _drop_unreadable(dataset: Dataset, image_column: str) -> tuple[Dataset, int]:
    # Corrupt files are skipped (with a count) rather than failing: one bad file in a scraped folder should not
    # stop a run, and checking up front means training never meets one half way through.
    scanned = dataset.map(_image_modes, input_columns=image_column, batched=True, desc="Checking images")
    kept = scanned.filter(lambda mode: mode is not None, input_columns="_mode")
    skipped = len(dataset) - len(kept)
    if skipped:
        first = scanned.filter(lambda mode: mode is None, input_columns="_mode")[0][image_column]
        logger.warning(
            "skipped %d unreadable image%s of %d (first: %s)",
            skipped,
            "s" if skipped > 1 else "",
            len(dataset),
            first.get("path") or "<in-memory bytes>",
        )
    if len(kept) == 0:
        raise DataError(f"none of the dataset's {len(dataset)} images can be read")
    channels = 1 if set(kept.unique("_mode")) <= GRAYSCALE_MODES else 3
    return kept.remove_columns("_mode"), channels


def subset_indices(dataset_size: int, size: int, seed: int = 0) -> np.ndarray:
    """The training subset of `size` images (`--train_subset`): the first `size` of a fixed random order of the
    dataset drawn from `seed`, in dataset order. Subsets of one seed are nested: the 32 images are among the 128.

    Example:
        >>> small, large = subset_indices(1797, 32), subset_indices(1797, 128)
        >>> len(small), set(small) <= set(large)
        (32, True)
    """
    if not 2 <= size <= dataset_size:
        raise DataError(
            f"train_subset must be from 2 to the dataset's {dataset_size} images, got {size}", "train_subset"
        )
    return np.sort(np.random.default_rng(seed).permutation(dataset_size)[:size])


class ImageTransform:
    """diffusers' unconditional augmentation without torchvision: resize the shorter side to `resolution`
    (bilinear), crop to a square (centre or random), optionally flip, scale to [-1, 1], CHW float tensor."""

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False, channels: int = 3):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.mode = {1: "L", 3: "RGB"}[channels]

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = image.convert(self.mode)
        width, height = image.size
        scale = self.resolution / min(width, height)
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        if self.center_crop:
            left, top = (size[0] - self.resolution) // 2, (size[1] - self.resolution) // 2
        else:
            left, top = rng.randint(0, size[0] - self.resolution), rng.randint(0, size[1] - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32).reshape(self.resolution, self.resolution, -1)
        return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
