"""Tests of kbfgs.experiments.data: readers on tiny files, CURVES generator, augmentation."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kbfgs.experiments import data as D

# ------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08, magic: bytes = b"\x00\x00") -> bytes:
    header = magic + bytes([dtype_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, **kw: object) -> Path:
    raw = idx_bytes(array, **kw)  # type: ignore[arg-type]
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_roundtrip(tmp_path: Path, name: str) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    t = D.read_idx(write_idx(tmp_path / name, a))
    assert t.dtype == torch.uint8
    assert torch.equal(t, torch.from_numpy(a))


def test_read_idx_1d(tmp_path: Path) -> None:
    a = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert D.read_idx(write_idx(tmp_path / "l-idx1-ubyte", a)).tolist() == [3, 1, 4, 1, 5]


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path: Path, gz: bool) -> None:
    raw = idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8))[:-5]
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*expected 7840 bytes.*7835"):
        D.read_idx(path)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "bad-magic", np.zeros((2, 2)), magic=b"\x01\x00")
    with pytest.raises(ValueError, match=r"bad-magic.*magic"):
        D.read_idx(path)


def test_read_idx_bad_dtype(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "bad-dtype", np.zeros((2, 2)), dtype_code=0x0D)
    with pytest.raises(ValueError, match=r"bad-dtype.*0x08"):
        D.read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match=r"broken.gz"):
        D.read_idx(path)


def write_mnist(directory: Path, n_train: int = 5, n_test: int = 3, gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        images[0, 0, 0] = 255
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)


@pytest.mark.parametrize("sub", ["", "mnist", "MNIST/raw"])
def test_load_mnist(tmp_path: Path, sub: str) -> None:
    write_mnist(tmp_path / sub, gz=sub != "mnist")
    d = D.load_dataset("mnist", tmp_path)
    assert d.x_train.shape == (5, 784) and d.x_train.dtype == torch.float32
    assert d.x_test is not None and d.x_test.shape == (3, 784)
    assert d.y_train is not None and d.y_train.dtype == torch.int64
    assert d.y_train.tolist() == [0, 1, 2, 3, 4]
    assert float(d.x_train.max()) == 1.0 and float(d.x_train.min()) >= 0.0
    assert D.as_images(d.x_train).shape == (5, 1, 28, 28)


def test_load_mnist_label_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz"):
        D.load_mnist(tmp_path)


def test_load_mnist_missing_lists_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        D.load_mnist(missing)
    msg = str(info.value)
    assert str(missing / "train-images-idx3-ubyte") in msg
    assert str(missing / "MNIST" / "raw" / "t10k-labels-idx1-ubyte") in msg
    assert "data_dir" in msg


def test_load_mnist_partial_dir_named(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: t10k-images-idx3-ubyte"):
        D.load_mnist(tmp_path)


def test_fashion_mnist_missing_mentions_debian(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(FileNotFoundError) as info:
        D.load_dataset("fashion-mnist", tmp_path / "nothing")
    msg = str(info.value)
    assert "dataset-fashion-mnist" in msg
    assert str(tmp_path / "no-debian" / "train-labels-idx1-ubyte") in msg


def test_fashion_mnist_subdir(tmp_path: Path) -> None:
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    d = D.load_mnist(tmp_path, kind="fashion-mnist")
    assert d.name == "fashion-mnist" and d.x_train.shape == (5, 784)


# ------------------------------------------------------------------------------------------
# .mat files
# ------------------------------------------------------------------------------------------


def test_load_faces(tmp_path: Path) -> None:
    import scipy.io

    rows = np.arange(7 * 625, dtype=np.float64).reshape(7, 625) / 1000.0
    scipy.io.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": rows.T})
    d = D.load_dataset("faces", tmp_path, n_train=5)
    assert d.x_train.dtype == torch.float32
    assert d.x_train.shape == (5, 625) and d.x_test is not None and d.x_test.shape == (2, 625)
    assert torch.allclose(d.x_train, torch.from_numpy(rows[:5]).float())
    assert torch.allclose(d.x_test, torch.from_numpy(rows[5:]).float())
    assert d.y_train is None


def test_load_faces_missing_key(tmp_path: Path) -> None:
    import scipy.io

    scipy.io.savemat(tmp_path / "newfaces_rot_single.mat", {"wrong": np.zeros((625, 2))})
    with pytest.raises(ValueError, match=r"newfaces_rot_single.mat.*newfaces_single"):
        D.load_faces(tmp_path)


def test_load_faces_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"newfaces_rot_single.mat"):
        D.load_faces(tmp_path)


def test_load_faces_not_a_mat(tmp_path: Path) -> None:
    (tmp_path / "newfaces_rot_single.mat").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match=r"newfaces_rot_single.mat"):
        D.load_faces(tmp_path)


def test_load_faces_v73_needs_h5py(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    try:
        import h5py  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("h5py is installed; the error path is not reachable")
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5"
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    (tmp_path / "newfaces_rot_single.mat").write_bytes(header + b"\x00" * 512)
    with pytest.raises(ValueError, match=r"newfaces_rot_single\.mat.*h5py"):
        D.load_faces(tmp_path)


def test_load_curves_from_file(tmp_path: Path) -> None:
    import scipy.io

    rng = np.random.default_rng(1)
    bdata, btest = rng.random((6, 784)), rng.random((4, 784))
    scipy.io.savemat(tmp_path / "digs3pts_1.mat", {"bdata": bdata, "bdatatest": btest})
    d = D.load_dataset("curves", tmp_path)
    assert d.x_train.shape == (6, 784) and d.x_test is not None and d.x_test.shape == (4, 784)
    assert torch.allclose(d.x_train, torch.from_numpy(bdata).float())
    assert torch.allclose(d.x_test, torch.from_numpy(btest).float())
    assert "original" in d.note


def test_load_curves_fallback(tmp_path: Path) -> None:
    d = D.load_curves(tmp_path, seed=3, n_train=10, n_test=4)
    assert d.x_train.shape == (10, 784) and d.x_test is not None and d.x_test.shape == (4, 784)
    assert "stand-in" in d.note and "NOT the original" in d.note
    assert torch.equal(d.x_train, D.generate_curves(10, 3))
    assert not torch.equal(d.x_test, d.x_train[:4])


# ------------------------------------------------------------------------------------------
# CURVES generator
# ------------------------------------------------------------------------------------------


def test_generate_curves_properties() -> None:
    state = torch.random.get_rng_state()
    a = D.generate_curves(200, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert a.shape == (200, 784) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, D.generate_curves(200, seed=7))
    assert torch.equal(a[:50], D.generate_curves(200, seed=7, chunk=16)[:50])
    assert not torch.equal(a, D.generate_curves(200, seed=8))
    assert bool((a.amax(dim=1) > 0.5).all())  # every image has ink
    ink = (a > 0.5).sum(dim=1)
    assert bool((ink >= 3).all()) and bool((ink < 784 // 2).all())  # a curve, not a blob
    assert torch.unique(a, dim=0).shape[0] == 200  # images differ


# ------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------


def write_batch(path: Path, n: int, label_key: str, offset: int, protocol: int = 2) -> None:
    data = np.full((n, 3072), offset, dtype=np.uint8)
    batch = {b"data": data, label_key.encode(): [(offset + i) % 10 for i in range(n)],
             b"batch_label": b"x"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def test_load_cifar10(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", 2, "labels", offset=i)
    write_batch(folder / "test_batch", 3, "labels", offset=0, protocol=5)
    d = D.load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_train.dtype == torch.float32
    assert d.y_train is not None and d.y_train.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert d.x_test is not None and d.x_test.shape == (3, 3, 32, 32)
    mean, std = torch.tensor(D.CIFAR10_MEAN), torch.tensor(D.CIFAR10_STD)
    assert torch.allclose(d.x_train[0, :, 0, 0], (1 / 255 - mean) / std)
    raw = D.load_cifar(folder, classes=10, normalize=False)  # the folder itself also works
    assert float(raw.x_test.abs().max()) == 0.0
    assert float(raw.x_train[-1].max()) == pytest.approx(5 / 255)


def test_load_cifar100(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    write_batch(folder / "train", 4, "fine_labels", offset=7)
    write_batch(folder / "test", 2, "fine_labels", offset=1)
    d = D.load_dataset("cifar100", tmp_path)
    assert d.x_train.shape == (4, 3, 32, 32) and d.x_test is not None
    assert d.y_test is not None and d.y_test.tolist() == [1, 2]


def test_cifar_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data_batch_1"):
        D.load_cifar(tmp_path, classes=10)
    folder = tmp_path / "cifar-100-python"
    write_batch(folder / "train", 2, "fine_labels", offset=0)
    (folder / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match=r"test"):
        D.load_cifar(tmp_path, classes=100)
    write_batch(folder / "test", 2, "labels", offset=0)  # wrong label key
    with pytest.raises(ValueError, match=r"fine_labels"):
        D.load_cifar(tmp_path, classes=100)


def test_cifar_refuses_foreign_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    write_batch(folder / "train", 2, "fine_labels", offset=0)
    with open(folder / "test", "wb") as f:
        pickle.dump({b"data": Path("x")}, f)
    with pytest.raises(ValueError, match=r"refusing"):
        D.load_cifar(tmp_path, classes=100)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match=r"cifar100"):
        D.load_dataset("imagenet")


# ------------------------------------------------------------------------------------------
# Augmentation
# ------------------------------------------------------------------------------------------


def test_augment_shape_and_determinism() -> None:
    x = torch.randn(16, 3, 32, 32)
    a = D.augment_crop_flip(x, torch.Generator().manual_seed(1))
    b = D.augment_crop_flip(x, torch.Generator().manual_seed(1))
    c = D.augment_crop_flip(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert D.augment_crop_flip(torch.randn(4, 1, 28, 28)).shape == (4, 1, 28, 28)


def test_crop_flip_exact() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    no = torch.tensor([False, False])
    pad = torch.tensor([4, 4])
    assert torch.equal(D.crop_flip(x, pad, pad, no), x)
    assert torch.equal(D.crop_flip(x, pad, pad, ~no), torch.flip(x, dims=[-1]))
    mixed = D.crop_flip(x, pad, pad, torch.tensor([True, False]))
    assert torch.equal(mixed[0], torch.flip(x[0], dims=[-1])) and torch.equal(mixed[1], x[1])
    # shift by one pixel right/down: content moves, zero padding enters
    shifted = D.crop_flip(x, pad - 1, pad - 1, no)
    assert torch.equal(shifted[:, :, 1:, 1:], x[:, :, :-1, :-1])
    assert float(shifted[:, :, 0, :].abs().sum()) == 0.0
    # per-channel fill
    full = D.crop_flip(x, torch.tensor([0, 0]), torch.tensor([0, 0]), no, fill=[1.0, 2.0, 3.0])
    assert full[:, :, 0, 0].tolist() == [[1.0, 2.0, 3.0]] * 2


def test_augment_flip_of_asymmetric_image() -> None:
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, :, :2] = 1.0  # ink on the left only
    out = D.augment_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    flipped = torch.flip(x, dims=[-1])
    is_flip = torch.tensor([torch.equal(o, f) for o, f in zip(out, flipped)])
    is_same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((is_flip ^ is_same).all())
    assert 0 < int(is_flip.sum()) < 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_cuda_matches_cpu() -> None:
    x = torch.randn(8, 3, 32, 32)
    cpu = D.augment_crop_flip(x, torch.Generator().manual_seed(3))
    gpu = D.augment_crop_flip(x.to("cuda"), torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    g = torch.Generator(device="cuda").manual_seed(3)
    assert D.augment_crop_flip(x.to("cuda"), g).shape == x.shape


# ------------------------------------------------------------------------------------------
# Non-finite data and data identity (issue 12, items 5 and 6)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_curves_file_is_refused_naming_file_and_index(tmp_path: Path,
                                                                 bad: float) -> None:
    """One bad pixel is refused at load, with the file and the first bad (sample, feature),
    instead of reaching the optimizer (a LinAlgError for K-BFGS, 'diverged' for Adam)."""
    import scipy.io

    rng = np.random.default_rng(2)
    bdata, btest = rng.random((6, 784)), rng.random((4, 784))
    bdata[3, 17] = bad
    bdata[5, 2] = bad  # a later one: the first is reported
    scipy.io.savemat(tmp_path / "digs3pts_1.mat", {"bdata": bdata, "bdatatest": btest})
    with pytest.raises(ValueError) as e:
        D.load_dataset("curves", tmp_path)
    msg = str(e.value)
    assert "digs3pts_1.mat" in msg and "bdata" in msg and "sample 3, feature 17" in msg, msg
    assert "2 non-finite values" in msg


def test_non_finite_faces_test_part_is_refused(tmp_path: Path) -> None:
    """FACES stores (625, N): the reported index is the sample's, after the transposition."""
    import scipy.io

    rows = np.zeros((7, 625))
    rows[6, 624] = np.nan
    scipy.io.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": rows.T})
    with pytest.raises(ValueError, match=r"newfaces_rot_single\.mat.*sample 6, feature 624"):
        D.load_faces(tmp_path, n_train=5)


def test_check_finite_passes_finite_data_through() -> None:
    x = torch.rand(4, 3)
    assert D.check_finite(x, "x") is x
    with pytest.raises(ValueError, match=r"what: non-finite value nan at sample 1, feature 2"):
        D.check_finite(torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, float("nan")]]), "what")


def test_fingerprint_depends_on_values_and_shapes_not_on_copies() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 784, generator=g)
    fp = D.fingerprint(x, None)
    assert fp == D.fingerprint(x.clone(), None) and len(fp) == 16
    assert fp != D.fingerprint(x[:299], None)  # another shape
    y = x.clone()
    y[0, 0] += 0.5  # the first element is always in the sample
    assert fp != D.fingerprint(y, None)
    assert fp != D.fingerprint(x, torch.zeros(1))  # other companion tensors
    assert fp != D.fingerprint(x.double(), None)  # another dtype


def test_loaders_name_their_source_without_the_directory(tmp_path: Path) -> None:
    import scipy.io

    scipy.io.savemat(tmp_path / "digs3pts_1.mat",
                     {"bdata": np.zeros((2, 784)), "bdatatest": np.zeros((1, 784))})
    assert D.load_curves(tmp_path).source == "digs3pts_1.mat"
    assert D.load_curves(None, n_train=2, n_test=0).source == "stand-in generator seed 0"
