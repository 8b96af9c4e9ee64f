"""Data sets of the paper's experiments (Appendix D.2, D.3) and CIFAR augmentation.

Every loader returns an :class:`ArrayData` of float32 CPU tensors (labels int64). Nothing is
ever downloaded: the files must be on disk. Fashion-MNIST is found where Debian's package
``dataset-fashion-mnist`` installs it (``/usr/share/datasets/fashion-mnist``); CURVES falls back
to a built-in stand-in generator when ``digs3pts_1.mat`` is not available.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PathLike = str | Path

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASET_NAMES",
    "DEBIAN_FASHION_MNIST_DIR",
    "FACES_N_TRAIN",
    "ArrayData",
    "as_images",
    "augment_crop_flip",
    "check_finite",
    "crop_flip",
    "fingerprint",
    "generate_curves",
    "load_cifar",
    "load_curves",
    "load_dataset",
    "load_faces",
    "load_mnist",
    "read_idx",
]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FACES_N_TRAIN = 103_500

# Per-channel statistics of the CIFAR training sets (pixels in [0, 1]); the std is the true
# per-pixel standard deviation over the whole training set.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass
class ArrayData:
    """A data set as tensors: inputs float32, labels int64 (None for autoencoder data)."""

    x_train: Tensor
    y_train: Tensor | None = None
    x_test: Tensor | None = None
    y_test: Tensor | None = None
    name: str = ""
    note: str = ""
    #: where the data came from, without its directory (a file name, "stand-in generator
    #: seed 0"): part of a run's data identity, with :func:`fingerprint`
    source: str = ""


def fingerprint(*tensors: Tensor | None, samples: int = 4096) -> str:
    """A cheap fingerprint of data: shapes, dtypes and a hash of ``samples`` evenly spaced
    elements of each tensor (16 hex digits). The same arrays give the same fingerprint
    wherever their files lie; a different data set of the same shape almost surely not."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        flat = t.detach().reshape(-1)
        step = max(flat.numel() // samples, 1)
        sample = flat[::step][:samples].to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def check_finite(x: Tensor, what: str) -> Tensor:
    """``x`` itself when every value is finite; else a ValueError naming ``what`` (the file
    and variable) and the first non-finite entry (row = sample, column = feature)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        where = f"sample {first[0]}" + (f", feature {first[1]}" if len(first) == 2 else
                                         f", index {first[1:]}" if len(first) > 2 else "")
        raise ValueError(f"{what}: non-finite value {float(x[first])} at {where} "
                         f"(index {first}; {int(bad.sum())} non-finite values in all); "
                         "fix or replace the file")
    return x


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping ``.gz``; corrupt gzip -> ValueError."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path.name}: not a valid gzip file ({e}) [{path}]") from e


def read_idx(path: PathLike) -> Tensor:
    """Read an IDX file of unsigned bytes (optionally gzipped) into a uint8 tensor."""
    path = Path(path)
    data = _read_bytes(path)
    name = path.name
    if len(data) < 4:
        raise ValueError(f"{name}: expected an IDX header of at least 4 bytes, found {len(data)}")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{name}: bad IDX magic number, expected two zero bytes first, "
                         f"found {data[0]:#04x} {data[1]:#04x}")
    if data[2] != _IDX_UBYTE:
        raise ValueError(f"{name}: expected IDX data type code 0x08 (unsigned byte), "
                         f"found {data[2]:#04x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: expected {header} header bytes for {ndim} dimensions, "
                         f"found {len(data)}")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if any(d < 0 for d in dims):
        raise ValueError(f"{name}: negative dimension in IDX header {dims}")
    expected = math.prod(dims)
    found = len(data) - header
    if found != expected:
        raise ValueError(f"{name}: expected {expected} bytes of data after the header "
                         f"(dims {tuple(dims)}), found {found}")
    flat = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    return flat.reshape(dims)


_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_MNIST_SUBDIRS = {
    "mnist": ("mnist", "MNIST", "MNIST/raw", "raw"),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST", "FashionMNIST/raw", "fashion_mnist",
                      "raw"),
}


def _mnist_dirs(data_dir: PathLike | None, kind: str) -> list[Path]:
    """Directories searched for the IDX files, in order."""
    dirs: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        dirs += [root] + [root / sub for sub in _MNIST_SUBDIRS[kind]]
    if kind == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST_DIR)
    return dirs


def _find_idx_files(directory: Path) -> dict[str, Path]:
    """Those of the four IDX files present in ``directory`` (plain or .gz)."""
    found: dict[str, Path] = {}
    for key, stem in _MNIST_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
    return found


def _mnist_missing_error(kind: str, dirs: list[Path],
                         partial: dict[Path, list[str]]) -> FileNotFoundError:
    tried = "\n".join(f"  {d / stem}[.gz]" for d in dirs for stem in _MNIST_FILES.values())
    if not dirs:
        tried = "  (nothing: data_dir is None)"
    for d, missing in partial.items():
        tried += f"\n{d} holds only some of the files; missing: {', '.join(missing)}"
    if kind == "fashion-mnist":
        how = ("Install Debian's package with `apt-get install dataset-fashion-mnist` "
               f"(files go to {DEBIAN_FASHION_MNIST_DIR}), or pass data_dir holding the files.")
    else:
        how = ("MNIST is not bundled: put the four IDX files (from "
               "http://yann.lecun.com/exdb/mnist/ or a mirror) in a directory and pass it as "
               "data_dir.")
    return FileNotFoundError(f"{kind}: could not find all four IDX files "
                             f"({', '.join(_MNIST_FILES.values())}). Tried:\n{tried}\n{how}")


def as_images(x: Tensor, channels: int = 1, size: int = 28) -> Tensor:
    """Reshape flattened images (N, C*size*size) to (N, C, size, size) for CNNs."""
    return x.reshape(x.shape[0], channels, size, size)


def load_mnist(data_dir: PathLike | None, kind: str = "mnist") -> ArrayData:
    """Load MNIST or Fashion-MNIST: x (N, 784) float32 in [0, 1], y int64."""
    if kind not in _MNIST_SUBDIRS:
        raise ValueError(f"kind must be one of {sorted(_MNIST_SUBDIRS)}, got {kind!r}")
    dirs = _mnist_dirs(data_dir, kind)
    partial: dict[Path, list[str]] = {}
    for directory in dirs:
        files = _find_idx_files(directory)
        if len(files) == len(_MNIST_FILES):
            return _load_idx_set(files, kind, directory)
        if files:
            partial[directory] = [v for k, v in _MNIST_FILES.items() if k not in files]
    raise _mnist_missing_error(kind, dirs, partial)


def _load_idx_set(files: dict[str, Path], kind: str, directory: Path) -> ArrayData:
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        xf, yf = files[f"x_{split}"].name, files[f"y_{split}"].name
        if x.ndim != 3 or tuple(x.shape[1:]) != (28, 28):
            raise ValueError(f"{xf}: expected images of shape (N, 28, 28), found {tuple(x.shape)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{yf}: expected {x.shape[0]} labels to match {xf}, "
                             f"found shape {tuple(y.shape)}")
    return ArrayData(
        x_train=arrays["x_train"].reshape(-1, 784).float().div_(255.0),
        y_train=arrays["y_train"].long(),
        x_test=arrays["x_test"].reshape(-1, 784).float().div_(255.0),
        y_test=arrays["y_test"].long(),
        name=kind,
        note=f"IDX files from {directory}",
        source="IDX files",
    )


# --------------------------------------------------------------------------------------------
# MATLAB files (FACES, CURVES)
# --------------------------------------------------------------------------------------------


def _read_mat(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read ``keys`` from a .mat file in MATLAB's orientation (as scipy.io.loadmat gives it)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=list(keys))
    except NotImplementedError:  # MATLAB v7.3 (HDF5)
        return _read_mat_hdf5(path, keys)
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"{path.name}: cannot read as a MATLAB .mat file ({e}) [{path}]") from e
    missing = [k for k in keys if k not in mat]
    if missing:
        raise ValueError(f"{path.name}: expected variable(s) {missing} in the .mat file, "
                         f"found {sorted(k for k in mat if not k.startswith('__'))}")
    return {k: np.asarray(mat[k]) for k in keys}


def _read_mat_hdf5(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read a v7.3 (HDF5) .mat file with h5py; arrays transposed back to MATLAB orientation."""
    try:
        import h5py
    except ImportError as e:
        raise ValueError(f"{path.name}: this is a MATLAB v7.3 (HDF5) file; install h5py "
                         "(`pip install h5py`) to read it, or re-save it with -v7") from e
    with h5py.File(path, "r") as f:
        missing = [k for k in keys if k not in f]
        if missing:
            raise ValueError(f"{path.name}: expected variable(s) {missing} in the .mat file, "
                             f"found {sorted(f.keys())}")
        return {k: np.asarray(f[k]).T for k in keys}


def _find_file(data_dir: PathLike | None, filename: str, subdirs: Sequence[str]) -> Path | None:
    """First existing ``data_dir[/sub]/filename``, or None."""
    for path in _candidates(data_dir, filename, subdirs):
        if path.is_file():
            return path
    return None


def _candidates(data_dir: PathLike | None, filename: str, subdirs: Sequence[str]) -> list[Path]:
    if data_dir is None:
        return []
    root = Path(data_dir).expanduser()
    return [root / filename] + [root / sub / filename for sub in subdirs]


def _rows_of_width(a: np.ndarray, width: int, what: str, features_first: bool) -> Tensor:
    """A 2-D array as (N, width) float32.

    ``features_first``: the file stores (width, N) (transposed); otherwise (N, width). The
    other orientation is accepted too when it is unambiguous.
    """
    if a.ndim != 2 or width not in a.shape:
        raise ValueError(f"{what}: expected a 2-D array with a side of {width}, "
                         f"found shape {a.shape}")
    if (features_first and a.shape[0] == width) or a.shape[1] != width:
        a = a.T
    return check_finite(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), what)


def load_faces(data_dir: PathLike | None, n_train: int = FACES_N_TRAIN) -> ArrayData:
    """FACES: ``newfaces_rot_single.mat`` key ``newfaces_single`` (625 x N, transposed).

    The first ``n_train`` rows (103,500, Appendix D.2) are the training set, the rest the test
    set (None when nothing is left).
    """
    filename, key = "newfaces_rot_single.mat", "newfaces_single"
    subdirs = ("faces", "FACES")
    path = _find_file(data_dir, filename, subdirs)
    if path is None:
        tried = "\n".join(f"  {p}" for p in _candidates(data_dir, filename, subdirs))
        raise FileNotFoundError(f"faces: could not find {filename}. Tried:\n{tried or '  none'}\n"
                                "It is not bundled: obtain it (from "
                                "http://www.cs.toronto.edu/~jmartens/newfaces_rot_single.mat) "
                                "and pass its directory as data_dir.")
    x = _rows_of_width(_read_mat(path, [key])[key], 625, f"{path.name}: {key}", True)
    x_test = x[n_train:].clone() if x.shape[0] > n_train else None
    return ArrayData(x_train=x[:n_train].clone(), x_test=x_test, name="faces",
                     note=f"{path}, first {n_train} rows as training set",
                     source=f"{filename} (first {n_train} rows as training set)")


def load_curves(data_dir: PathLike | None = None, seed: int = 0, n_train: int = 20_000,
                n_test: int = 10_000) -> ArrayData:
    """CURVES: ``digs3pts_1.mat`` (``bdata``, ``bdatatest``) if in ``data_dir``, else generated.

    The fallback is :func:`generate_curves`, a stand-in that is *not* the original data set.
    """
    path = _find_file(data_dir, "digs3pts_1.mat", ("curves", "CURVES"))
    if path is not None:
        mats = _read_mat(path, ["bdata", "bdatatest"])
        return ArrayData(x_train=_rows_of_width(mats["bdata"], 784, f"{path.name}: bdata", False),
                         x_test=_rows_of_width(mats["bdatatest"], 784,
                                                       f"{path.name}: bdatatest", False),
                         name="curves", note=f"original CURVES file {path}",
                         source=path.name)
    x_train = generate_curves(n_train, seed)
    x_test = generate_curves(n_test, seed + 1_000_003) if n_test > 0 else None
    return ArrayData(x_train=x_train, x_test=x_test, name="curves",
                     note=("built-in stand-in generator (smooth curves through 3 random points, "
                           f"seed {seed}), NOT the original CURVES file digs3pts_1.mat"),
                     source=f"stand-in generator seed {seed}")


# --------------------------------------------------------------------------------------------
# CURVES stand-in generator
# --------------------------------------------------------------------------------------------


def _curve_points(anchors: Tensor, n_samples: int) -> Tensor:
    """Points (N, n_samples, 2) on the quadratic through 3 anchors (N, 3, 2).

    The middle anchor's parameter is set by chord length, so the curve passes through the
    three anchors in order without looping back.
    """
    p0, p1, p2 = anchors.unbind(1)
    d01 = (p1 - p0).norm(dim=1)
    d12 = (p2 - p1).norm(dim=1)
    t1 = (d01 / (d01 + d12).clamp_min(1e-6)).clamp(0.15, 0.85)[:, None]
    t = torch.linspace(0.0, 1.0, n_samples)[None, :]
    l0 = (t - t1) * (t - 1.0) / t1
    l1 = t * (t - 1.0) / (t1 * (t1 - 1.0))
    l2 = t * (t - t1) / (1.0 - t1)
    return l0[..., None] * p0[:, None] + l1[..., None] * p1[:, None] + l2[..., None] * p2[:, None]


def _render(points: Tensor, size: int, pen_sigma: float, radius: int = 3) -> Tensor:
    """Soft-pen rendering: pixel value exp(-d^2 / 2 sigma^2), d = distance to the curve.

    ``points`` (N, S, 2) holds dense (x, y) samples along each curve; returns (N, size * size).
    Each sample stamps a separable Gaussian on the pixels within ``radius`` of it and a pixel
    keeps the largest stamp, so d is the distance to the nearest sample (values further than
    ``radius - 0.5`` pixels, below 1%, are dropped). Stamps go to a canvas padded by
    ``radius``, which is cropped at the end.
    """
    n = points.shape[0]
    width = size + 2 * radius
    base = points.round().clamp_(0, size - 1)  # stamp centre, kept inside the image
    off = torch.arange(-radius, radius + 1, dtype=points.dtype)
    gauss = torch.exp((base - points)[..., None].add(off).square_().mul_(-0.5 / pen_sigma**2))
    val = gauss[..., 1, :, None] * gauss[..., 0, None, :]  # (N, S, rows, cols)
    centre = ((base[..., 1] + radius) * width + base[..., 0] + radius).long()  # (N, S)
    k = torch.arange(-radius, radius + 1)
    stamp = (k[:, None] * width + k[None, :]).reshape(-1)  # (K,) flat offsets
    idx = (centre[..., None] + stamp).reshape(n, -1)
    canvas = torch.zeros(n, width * width, dtype=points.dtype)
    canvas.scatter_reduce_(1, idx, val.reshape(n, -1), "amax")
    img = canvas.view(n, width, width)[:, radius:radius + size, radius:radius + size]
    return img.reshape(n, size * size)


def generate_curves(n: int, seed: int = 0, size: int = 28, n_samples: int = 96,
                    pen_sigma: float = 0.8, chunk: int = 1024) -> Tensor:
    """Stand-in for CURVES: (n, size*size) float32 images in [0, 1] of smooth random curves.

    Each image shows the quadratic curve through 3 points drawn uniformly from the central
    region of the image, drawn with a soft Gaussian pen. Deterministic per ``seed`` (a local
    generator; the global RNG is untouched) and independent of ``chunk``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(seed)
    margin = 0.1 * (size - 1)
    anchors = torch.rand(n, 3, 2, generator=g) * (size - 1 - 2 * margin) + margin
    out = torch.empty(n, size * size, dtype=torch.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        out[start:stop] = _render(_curve_points(anchors[start:stop], n_samples), size, pen_sigma)
    return out.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------

_CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
         b"labels", CIFAR10_MEAN, CIFAR10_STD),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels", CIFAR100_MEAN, CIFAR100_STD),
}
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytearray"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a CIFAR batch cannot run arbitrary code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise ValueError(f"{path.name}: not a readable CIFAR python batch ({e}) [{path}]") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path.name}: expected a dict with keys b'data' and {label_key!r}, "
                         f"found {keys}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(f"{path.name}: expected data (N, 3072) and N labels, found "
                         f"{data.shape} and {labels.shape}")
    return data, labels


def _cifar_dir(data_dir: PathLike, folder: str, names: Sequence[str]) -> Path:
    root = Path(data_dir).expanduser()
    dirs = [root / folder, root]
    for d in dirs:
        if all((d / n).is_file() for n in names):
            return d
    tried = "\n".join(f"  {d / n}" for d in dirs for n in names)
    raise FileNotFoundError(f"{folder}: could not find the CIFAR python batches. Tried:\n{tried}\n"
                            "Download the 'python version' archive from "
                            "https://www.cs.toronto.edu/~kriz/cifar.html, extract it and pass "
                            "the directory holding it as data_dir.")


def _cifar_split(d: Path, names: Sequence[str], label_key: bytes, mean: Tensor,
                 std: Tensor | None) -> tuple[Tensor, Tensor]:
    parts = [_load_cifar_batch(d / n, label_key) for n in names]
    data = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    x = data.reshape(-1, 3, 32, 32).float().div_(255.0)
    if std is not None:
        x = x.sub_(mean).div_(std)
    return x, torch.from_numpy(np.concatenate([p[1] for p in parts]))


def load_cifar(data_dir: PathLike, classes: int = 10, normalize: bool = True) -> ArrayData:
    """CIFAR-10/100 python batches: x (N, 3, 32, 32) float32, y int64.

    Pixels are divided by 255 and, if ``normalize``, standardised per channel with
    ``CIFAR{10,100}_MEAN`` / ``CIFAR{10,100}_STD``.
    """
    if classes not in _CIFAR:
        raise ValueError(f"classes must be 10 or 100, got {classes!r}")
    if data_dir is None:
        raise FileNotFoundError(f"cifar{classes}: data_dir is required (CIFAR is not bundled)")
    folder, train_names, test_names, label_key, mean, std = _CIFAR[classes]
    d = _cifar_dir(data_dir, folder, [*train_names, *test_names])
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1) if normalize else None
    x_train, y_train = _cifar_split(d, train_names, label_key, m, s)
    x_test, y_test = _cifar_split(d, test_names, label_key, m, s)
    norm = f"normalised with mean {mean}, std {std}" if normalize else "in [0, 1]"
    return ArrayData(x_train, y_train, x_test, y_test, name=f"cifar{classes}",
                     note=f"python batches from {d}, {norm}",
                     source=f"python batches, {'normalised' if normalize else 'in [0, 1]'}")


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int = 4,
              fill: float | Sequence[float] | Tensor = 0.0) -> Tensor:
    """Deterministic batched crop-and-flip of (N, C, H, W) images.

    Each image is padded by ``padding`` pixels of ``fill`` (a scalar or one value per channel),
    the (H, W) window starting at (``top[n]``, ``left[n]``) of the padded image is taken
    (``top == left == padding`` is no shift), and it is mirrored horizontally where ``flip[n]``.
    """
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    n, c, h, w = x.shape
    padded = _pad(x, padding, fill)
    dev = x.device
    top, left, flip = top.to(dev).long(), left.to(dev).long(), flip.to(dev).bool()
    rows = top[:, None] + torch.arange(h, device=dev)[None, :]  # (N, H)
    col = torch.arange(w, device=dev)[None, :]
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - col, col)  # (N, W)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def _pad(x: Tensor, padding: int, fill: float | Sequence[float] | Tensor) -> Tensor:
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    if fill_t.numel() == 1:
        return F.pad(x, (padding,) * 4, value=float(fill_t))
    out = fill_t.view(1, -1, 1, 1).expand(x.shape[0], x.shape[1], x.shape[2] + 2 * padding,
                                          x.shape[3] + 2 * padding).clone()
    out[:, :, padding:padding + x.shape[2], padding:padding + x.shape[3]] = x
    return out


def augment_crop_flip(x: Tensor, generator: torch.Generator | None = None, padding: int = 4,
                      fill: float | Sequence[float] | Tensor = 0.0) -> Tensor:
    """Random crop (same size, ``padding`` pixels of zero/``fill`` padding) and horizontal flip.

    Batched on ``x``'s device; the random draws come from ``generator`` (on its own device)
    or, without one, from the global RNG of ``x``'s device. For normalised CIFAR, pass
    ``fill = -mean/std`` to pad with black as torchvision's RandomCrop on raw images does.
    """
    n = x.shape[0]
    dev = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=dev)
    flip = torch.randint(0, 2, (n,), generator=generator, device=dev).bool()
    return crop_flip(x, offsets[0], offsets[1], flip, padding, fill)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[..., ArrayData]] = {
    "mnist": lambda d, **kw: load_mnist(d, kind="mnist", **kw),
    "fashion-mnist": lambda d, **kw: load_mnist(d, kind="fashion-mnist", **kw),
    "faces": lambda d, **kw: load_faces(d, **kw),
    "curves": lambda d, **kw: load_curves(d, **kw),
    "cifar10": lambda d, **kw: load_cifar(d, classes=10, **kw),
    "cifar100": lambda d, **kw: load_cifar(d, classes=100, **kw),
}
DATASET_NAMES = tuple(_LOADERS)


def load_dataset(name: str, data_dir: PathLike | None = None, **kw: Any) -> ArrayData:
    """Load a data set by name: one of :data:`DATASET_NAMES`."""
    key = name.lower()
    if key not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return _LOADERS[key](data_dir, **kw)
