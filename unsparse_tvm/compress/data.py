"""Data sets for fine-tuning and accuracy: sklearn's bundled `digits` and CIFAR-10 from a local folder.

`load_dataset("digits")` or `load_dataset("cifar10:PATH")` returns normalised float tensors with a fixed
train/test split, so accuracies in reports are comparable between runs. Nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import UnsparseError

DATASET_HELP = "digits (sklearn's bundled 8x8 digits) or cifar10:PATH (folder with data_batch_1..5 and test_batch)"

# per-channel statistics of the CIFAR-10 training set (the values everyone uses)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # [N,C,H,W] float32, normalised
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape (C, H, W)."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def train_loader(self, batch_size: int = 64, seed: int = 0) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)  # same shuffling order every run
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=batch_size, shuffle=True, generator=gen)

    def test_loader(self, batch_size: int = 256) -> DataLoader:
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=batch_size)


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """`digits` or `cifar10:PATH`; anything else, or a bad folder, raises UnsparseError."""
    if spec == "digits":
        return load_digits(seed)
    if spec.startswith("cifar10:"):
        return load_cifar10(spec[len("cifar10:"):])
    if spec == "cifar10":
        raise UnsparseError("cifar10 needs a folder: --dataset cifar10:PATH (the extracted cifar-10-batches-py)")
    raise UnsparseError(f"unknown data set '{spec}': use {DATASET_HELP}")


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """sklearn's 1797 8x8 digits: pixels scaled to [0,1], then normalised with the training mean/std."""
    from sklearn.datasets import load_digits as sk_digits  # deferred: scikit-learn is slow to import
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = bunch.data.astype(np.float32) / 16.0  # [1797,64], pixel values are 0..16
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())  # training statistics only: no test leakage
    to_t = lambda a: torch.from_numpy((a - mean) / std).reshape(-1, 1, 8, 8)  # [N,1,8,8]
    return Dataset("digits", to_t(x_tr), torch.from_numpy(y_tr), to_t(x_te), torch.from_numpy(y_te))


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # the official python version is a pickled dict
    except Exception as err:
        raise UnsparseError(f"{path} is not a CIFAR-10 python batch (unpickling failed: {type(err).__name__})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UnsparseError(f"{path} is not a CIFAR-10 python batch (no b'data' and b'labels' entries)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise UnsparseError(
            f"{path}: expected b'data' of shape [N, 3072] and N labels, got {list(data.shape)} and {labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UnsparseError(f"{path}: CIFAR-10 labels must be 0..9")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels  # [N,3,32,32] (rows are channel-major)


def load_cifar10(path: str) -> Dataset:
    """CIFAR-10 in its python-pickle format: `data_batch_1..5` (those present) and `test_batch`."""
    if not path:
        raise UnsparseError("cifar10 needs a folder: --dataset cifar10:PATH")
    if not os.path.isdir(path):
        raise UnsparseError(f"CIFAR-10 folder {path} does not exist")
    nested = os.path.join(path, "cifar-10-batches-py")  # accept the folder the tarball was extracted into
    if not os.path.exists(os.path.join(path, "test_batch")) and os.path.isdir(nested):
        path = nested
    train_files = [os.path.join(path, f"data_batch_{i}") for i in range(1, 6)]
    train_files = [f for f in train_files if os.path.exists(f)]
    test_file = os.path.join(path, "test_batch")
    if not train_files or not os.path.exists(test_file):
        raise UnsparseError(f"{path} is not a CIFAR-10 python folder: it needs data_batch_1..5 and test_batch")
    parts = [_read_cifar_batch(f) for f in train_files]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(test_file)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    to_t = lambda a: (torch.from_numpy(a).float() / 255.0 - mean) / std  # [N,3,32,32]
    return Dataset("cifar10", to_t(x_tr), torch.from_numpy(y_tr), to_t(x_te), torch.from_numpy(y_te))
