"""Image data sets: sklearn's 8x8 digits, `.npz` arrays and image folders, as (N, C, H, W) tensors in [-1, 1].

Sources (`data.name` in a config):
  digits        sklearn's 1797 8x8 digits (ships with scikit-learn; no download), 17 grey levels 0..16
  npz           `data.path` to an .npz with images under key `x` (or `data.options.x_key`) shaped (N, H, W),
                (N, H, W, C) or (N, C, H, W), C in {1, 3, 4}, and optional integer labels under `y`
                (`data.options.y_key`); uint8 is read as 0..255, floats must lie in [0, 1] or [-1, 1]
                unless `data.options.value_range: [lo, hi]` says otherwise
  image_folder  `data.path` to a folder of images, either flat (unlabelled) or one sub-folder per class
                (labels are the sorted sub-folder names); all images must share one size
The held-out split is a fixed permutation seeded by `data.seed` (`data.test_fraction` of the images).
Every failure (missing path, bad shape, NaN, unreadable file) raises ValueError naming the input.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import check_finite

__all__ = ["ImageData", "IMAGE_DATASETS", "load_images", "load_digits", "load_npz", "load_image_folder",
           "split", "image_bin_width"]

IMAGE_DATASETS = ("digits", "npz", "image_folder")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class ImageData:
    """x: (N, C, H, W) float32 in [-1, 1]; labels: (N,) long or None; n_levels: grey levels of the source
    (17 for digits, 256 for 8-bit images, None for float arrays), mapped to -1 + 2 k / (n_levels - 1)."""
    x: Tensor
    labels: Tensor | None
    num_classes: int | None
    n_levels: int | None
    name: str

    def __len__(self) -> int:
        return self.x.shape[0]


def image_bin_width(n_levels: int | None) -> float:
    """Width of one quantisation bin in [-1, 1] units (2 / (n_levels - 1))."""
    if n_levels is None or n_levels < 2:
        raise ValueError("dequantisation needs integer-valued source images (digits, uint8 arrays or image files); "
                         "this data set holds float arrays")
    return 2.0 / (n_levels - 1)


def load_digits() -> ImageData:
    """sklearn's digits: (1797, 1, 8, 8), values 0..16 scaled to [-1, 1], labels 0..9."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return ImageData(x, torch.tensor(d.target, dtype=torch.long), 10, 17, "digits")


def _to_nchw(a: np.ndarray, where: str) -> np.ndarray:
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4:
        if a.shape[-1] in (1, 3, 4):
            return np.moveaxis(a, -1, 1)
        if a.shape[1] in (1, 3, 4):
            return a
    raise ValueError(f"{where}: images must be shaped (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4; "
                     f"got {a.shape}")


def _scale(a: np.ndarray, value_range, where: str) -> tuple[Tensor, int | None]:
    """Map stored values to [-1, 1]; returns the tensor and the number of grey levels (None for floats)."""
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{where}: images must be integers or floats, got dtype {a.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    check_finite(x, where)
    levels = None
    if value_range is None:
        lo_x, hi_x = float(x.min()), float(x.max())
        if np.issubdtype(a.dtype, np.integer):
            value_range, levels = (0.0, 255.0), 256
        elif lo_x >= 0 and hi_x <= 1:
            value_range = (0.0, 1.0)
        elif lo_x >= -1 and hi_x <= 1:
            value_range = (-1.0, 1.0)
        else:
            raise ValueError(f"{where}: float images lie in [{lo_x:.4g}, {hi_x:.4g}], neither [0, 1] nor [-1, 1]; "
                             "set data.options.value_range: [lo, hi]")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"{where}: value_range must be [lo, hi] with hi > lo, got {list(value_range)}")
    if float(x.min()) < lo or float(x.max()) > hi:
        raise ValueError(f"{where}: values [{float(x.min()):.4g}, {float(x.max()):.4g}] leave value_range [{lo}, {hi}]")
    if levels is None and np.issubdtype(a.dtype, np.integer) and lo == 0 and hi.is_integer():
        levels = int(hi) + 1
    return (2 * (x - lo) / (hi - lo) - 1).float(), levels


def _labels(y: np.ndarray, n: int, where: str) -> tuple[Tensor, int]:
    if y.shape != (n,):
        raise ValueError(f"{where}: labels must be shaped ({n},) like the images, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"{where}: labels must be integers 0..K-1, got dtype {y.dtype}")
    if n and y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got {int(y.min())}")
    return torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1 if n else 0


def load_npz(path: str | Path, x_key: str = "x", y_key: str | None = "y", value_range=None) -> ImageData:
    """Images (and labels, when the file has y_key) from an .npz file; see the module docstring for layouts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"npz data: no file at {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a corrupt file
        raise ValueError(f"npz data: cannot read {path} as .npz: {e}") from None
    with archive:
        if x_key not in archive.files:
            raise ValueError(f"npz data: {path} has no array {x_key!r}; it holds {archive.files} (set data.options.x_key)")
        a = _to_nchw(archive[x_key], f"{path}[{x_key!r}]")
        y = archive[y_key] if y_key is not None and y_key in archive.files else None
    if a.shape[0] < 1:
        raise ValueError(f"npz data: {path}[{x_key!r}] holds no images")
    x, levels = _scale(a, value_range, f"{path}[{x_key!r}]")
    labels, k = _labels(y, a.shape[0], f"{path}[{y_key!r}]") if y is not None else (None, None)
    return ImageData(x, labels, k, levels, path.name)


def load_image_folder(path: str | Path, channels: int | None = None) -> ImageData:
    """Images from a flat folder (unlabelled) or from one sub-folder per class; channels 1 or 3 (default: 1 if all are grey)."""
    from PIL import Image

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"image folder: no folder at {path}")
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if subdirs:
        files = [(f, k) for k, d in enumerate(subdirs) for f in sorted(d.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    else:
        files = [(f, None) for f in sorted(path.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"image folder: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {path} or its sub-folders")
    if channels not in (None, 1, 3):
        raise ValueError(f"image folder: channels must be 1 or 3, got {channels}")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except Exception as e:
            raise ValueError(f"image folder: cannot read {f}: {e}") from None
    if channels is None:
        channels = 1 if all(im.mode in ("L", "1", "I;16") for im in images) else 3
    arrays = [np.asarray(im.convert("L" if channels == 1 else "RGB")) for im in images]
    size = arrays[0].shape
    for (f, _), arr in zip(files, arrays):
        if arr.shape != size:
            raise ValueError(f"image folder: {f} is {arr.shape[1]}x{arr.shape[0]}, but {files[0][0]} is {size[1]}x{size[0]}; "
                             "all images must share one size")
    a = np.stack(arrays)
    x, levels = _scale(a, (0, 255), f"image folder {path}")
    labels = torch.tensor([k for _, k in files], dtype=torch.long) if subdirs else None
    return ImageData(_to_nchw_tensor(x), labels, len(subdirs) if subdirs else None, levels, path.name)


def _to_nchw_tensor(x: Tensor) -> Tensor:
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def split(data: ImageData, test_fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """(train, test) by a permutation seeded with `seed`; test takes round(test_fraction N) images."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = len(data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * n))
    if n - n_test < 1:
        raise ValueError(f"{data.name}: {n} image(s) leave none for training at test_fraction={test_fraction}")

    def take(idx):
        return replace(data, x=data.x[idx], labels=None if data.labels is None else data.labels[idx])

    return take(perm[n_test:]), take(perm[:n_test])


def load_images(name: str, path: str | None = None, test_fraction: float = 0.2, seed: int = 0,
                **options) -> tuple[ImageData, ImageData]:
    """(train, test) ImageData of the named source; options go to the source's loader."""
    if name == "digits":
        if path is not None or options:
            raise ValueError(f"digits ships with scikit-learn and takes no data.path or data.options, got path={path!r}, "
                             f"options={options}")
        data = load_digits()
    elif name in ("npz", "image_folder"):
        if path is None:
            raise ValueError(f"data.name={name!r} needs data.path")
        loader = load_npz if name == "npz" else load_image_folder
        try:
            data = loader(path, **options)
        except TypeError as e:
            raise ValueError(f"data.options {options} do not fit the {name} loader: {e}") from None
    else:
        raise ValueError(f"unknown image data set {name!r}; expected one of {IMAGE_DATASETS}")
    return split(data, test_fraction, seed)
