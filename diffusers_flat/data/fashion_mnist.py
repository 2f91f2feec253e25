"""Fashion-MNIST offline: Debian's `dataset-fashion-mnist` package ships the full dataset (60,000 training and 10,000
test images, 28x28 grayscale, 10 classes, MIT) as the original idx files. Read here into a `datasets.Dataset` with
the columns of the Hub's `zalando-datasets/fashion_mnist` (`image`, and `label` as a ClassLabel with its names), so
`--dataset_name fashion_mnist` trains and evaluates on the same data offline as online.

The idx format (LeCun's): a big-endian header of two zero bytes, a type code (0x08: unsigned bytes) and the number
of dimensions, then each dimension as a big-endian int32, then the values in C order. No kept library reads it
without downloading (torchvision's reader is bound to its downloader), so it is read by hand.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature

from diffusers_flat.errors import FlatError

NAME = "fashion_mnist"  # the --dataset_name that reads the local files when they exist
DIRECTORY = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HELD_OUT = "test"  # the split FID and KID compare with when a model trained on the others
CLASS_NAMES = (
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
)
UBYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array an idx file holds (gzipped or not), as uint8.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
        >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 1, 9]))
        >>> read_idx(path).tolist()
        [7, 1, 9]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except OSError as err:
        raise FlatError(f"{path}: not a readable idx file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != UBYTE:
        raise FlatError(f"{path}: not an idx file of unsigned bytes (its magic number is {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise FlatError(
            f"{path}: its header says {shape} ({int(np.prod(shape))} bytes), it holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def local_files(split: str, directory: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """The split's image and label files (in `directory`, default `DIRECTORY`) when both exist, else None."""
    if split not in FILES:
        return None
    images, labels = (Path(directory or DIRECTORY) / name for name in FILES[split])
    return (images, labels) if images.is_file() and labels.is_file() else None


def load_fashion_mnist(split: str = "train", directory: str | os.PathLike | None = None) -> Dataset:
    """A split of Fashion-MNIST read from the idx files, with the Hub dataset's features.

    Args:
        split: train (60,000 images) or test (10,000).
        directory: where the idx files are (default `DIRECTORY`, where Debian's package puts them).

    Example:
        >>> test = load_fashion_mnist("test")  # doctest: +SKIP
        >>> len(test), test.features["label"].names[0]  # doctest: +SKIP
        (10000, 'T - shirt / top')
    """
    directory = Path(directory or DIRECTORY)
    if split not in FILES:
        raise FlatError(f"dataset_split must be one of {', '.join(FILES)} for {NAME}, got {split!r}", "dataset_split")
    files = local_files(split, directory)
    if files is None:
        missing = ", ".join(str(directory / name) for name in FILES[split])
        raise FlatError(f"dataset_name {NAME}: missing {missing}; install them with apt-get install {PACKAGE}")
    images, labels = (read_idx(path) for path in files)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) >= 10:
        raise FlatError(f"{files[0]}: {images.shape} images do not match {files[1]}'s {labels.shape} labels")
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASS_NAMES))})
    return Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
