"""DataModules: embedded data, synthetic teacher, stdlib text, and local torchvision files in their real formats."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from example_modules import CharTextDataModule, DigitsDataModule, TeacherDataModule, TorchvisionDataModule
from lightning_align.measure.rank import numerical_rank


def test_digits_vectors_and_images() -> None:
    dm = DigitsDataModule(batch_size=16, val_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 1797
    x, y = dm.train_set[0]
    assert x.shape == (64,) and y.dtype == torch.long
    img = DigitsDataModule(as_images=True)
    img.setup()
    assert img.train_set[0][0].shape == (1, 8, 8)


def test_teacher_latent_dimension_shows_in_targets() -> None:
    dm = TeacherDataModule(in_features=10, out_features=6, latent_dim=2, teacher_depth=0, n_samples=300)
    dm.setup()
    y = dm.train_set.tensors[1]
    # with no hidden layer after the latent the teacher is affine through 2 dimensions
    assert numerical_rank(y - y.mean(0), tol=1e-5) == 2
    cls = TeacherDataModule(out_features=3, task="classification", n_samples=100)
    cls.setup()
    assert cls.train_set.tensors[1].dtype == torch.long
    with pytest.raises(ValueError, match="task"):
        TeacherDataModule(task="ranking")


def test_char_text_default_corpus_is_python_stdlib() -> None:
    dm = CharTextDataModule(block_size=32, max_bytes=50_000, batch_size=4)
    dm.setup()
    x, y = dm.train_set[3]
    assert x.shape == (32,) and torch.equal(x[1:], y[:-1])
    text = bytes(dm.train_set.data[:2000].tolist()).decode("utf-8", "replace")
    assert "import" in text or "def " in text


def test_char_text_missing_file_says_where(tmp_path: Path) -> None:
    dm = CharTextDataModule(path=str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        dm.setup()


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: magic (0x00 0x00, type 0x08 = unsigned byte, ndim), big-endian dims, raw bytes."""
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", (0x08 << 8) | array.ndim))
        fh.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def test_mnist_from_local_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(5))
    dm = TorchvisionDataModule(name="mnist", root=str(tmp_path), flatten=True, batch_size=4)
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape == (12, 784) and y.tolist() == [i % 10 for i in range(12)]
    expected = (torch.tensor(train_x[3].reshape(-1) / 255.0, dtype=torch.float32) - 0.1307) / 0.3081
    assert torch.allclose(x[3], expected, atol=1e-5)
    assert len(dm.val_set) == 5


def test_cifar10_from_local_python_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [1, 2, 3]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    dm = TorchvisionDataModule(name="cifar10", root=str(tmp_path), batch_size=2)
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape == (15, 3, 32, 32) and y[:3].tolist() == [1, 2, 3]


@pytest.mark.parametrize("name,needle", [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")])
def test_missing_dataset_error_says_where_and_how(tmp_path: Path, name: str, needle: str) -> None:
    dm = TorchvisionDataModule(name=name, root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=needle) as err:
        dm.setup()
    assert str(tmp_path) in str(err.value) and "download" in str(err.value)
