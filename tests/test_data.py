"""Data sets: sklearn digits split/normalisation, CIFAR-10 python-pickle folders (a tiny one built here)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from unsparse_tvm.compress.data import CIFAR_MEAN, CIFAR_STD, load_dataset
from unsparse_tvm.errors import UnsparseError


def write_cifar(folder, n_train=(6, 4), n_test=5, seed=0) -> None:
    """A tiny CIFAR-10 folder in the official format: pickled dicts with b'data' [N,3072] uint8, b'labels'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = [(f"data_batch_{i + 1}", n) for i, n in enumerate(n_train)] + [("test_batch", n_test)]
    for name, n in files:
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)], b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_digits_split_is_fixed_stratified_and_normalised():
    d = load_dataset("digits")
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert torch.bincount(d.y_test, minlength=10).min() >= 35  # stratified: every digit ~36 times
    again = load_dataset("digits")
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.y_train, d.y_train)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.y_test, d.y_test)


def test_digits_loader_shuffles_reproducibly():
    d = load_dataset("digits")
    first = [y for _, y in d.train_loader(64, seed=3)][0]
    assert torch.equal(first, [y for _, y in d.train_loader(64, seed=3)][0])
    assert not torch.equal(first, d.y_train[:64])


def test_tiny_cifar_folder(tmp_path):
    write_cifar(tmp_path / "c10")
    d = load_dataset(f"cifar10:{tmp_path / 'c10'}")
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32)
    assert d.input_shape == (3, 32, 32)
    # rows are channel-major (R plane, G plane, B plane): a sample with only red at 255
    with open(tmp_path / "c10" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"data"][0] = 0
    batch[b"data"][0, :1024] = 255
    with open(tmp_path / "c10" / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    x = load_dataset(f"cifar10:{tmp_path / 'c10'}").x_test[0]  # [3,32,32]
    assert torch.allclose(x[0], torch.full((32, 32), (1 - CIFAR_MEAN[0]) / CIFAR_STD[0]))
    assert torch.allclose(x[2], torch.full((32, 32), -CIFAR_MEAN[2] / CIFAR_STD[2]))


def test_cifar_extracted_parent_folder_is_accepted(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    assert load_dataset(f"cifar10:{tmp_path}").x_test.shape[0] == 5


@pytest.mark.parametrize("spec, message", [
    ("mnist", "unknown data set"),
    ("cifar10", "needs a folder"),
    ("cifar10:", "needs a folder"),
    ("cifar10:/no/such/folder", "does not exist"),
])
def test_dataset_spec_errors(spec, message):
    with pytest.raises(UnsparseError, match=message):
        load_dataset(spec)


def test_cifar_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnsparseError, match="data_batch_1..5 and test_batch"):
        load_dataset(f"cifar10:{empty}")
    write_cifar(tmp_path / "garbage")
    (tmp_path / "garbage" / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(UnsparseError, match="unpickling failed"):
        load_dataset(f"cifar10:{tmp_path / 'garbage'}")
    write_cifar(tmp_path / "keys")
    with open(tmp_path / "keys" / "data_batch_1", "wb") as f:
        pickle.dump({"data": [], "labels": []}, f)  # str keys: not the python-pickle format
    with pytest.raises(UnsparseError, match="b'data'"):
        load_dataset(f"cifar10:{tmp_path / 'keys'}")
    write_cifar(tmp_path / "shape")
    with open(tmp_path / "shape" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(UnsparseError, match=r"\[N, 3072\]"):
        load_dataset(f"cifar10:{tmp_path / 'shape'}")
