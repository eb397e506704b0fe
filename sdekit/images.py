"""Image data sets: sklearn's 8x8 digits, `.npz` arrays and image folders, as (N, C, H, W) tensors in [-1, 1].

Sources (`data.name` in a config):
  digits        sklearn's 1797 8x8 digits (ships with scikit-learn; no download), 17 grey levels 0..16
  npz           `data.path` to an .npz with images under key `x` (or `data.options.x_key`) shaped (N, H, W),
                (N, H, W, C) or (N, C, H, W), and optional integer labels under `y` (`data.options.y_key`).
                The layout of a 4-D array is read from where a channel count (1, 3 or 4) sits; when both axis 1
                and axis 3 could be it, `data.layout: NCHW | NHWC` must say which. Values: uint8 is read as
                0..255; other integer dtypes need `data.value_range: [lo, hi]` (int arrays hold 0..16 as often as
                0..65535); floats must lie in [0, 1] or [-1, 1] unless `data.value_range` says otherwise
  image_folder  `data.path` to a folder of images, either flat (unlabelled) or one sub-folder per class
                (labels are the sorted sub-folder names); hidden files and folders (.ipynb_checkpoints) are
                skipped; images next to class sub-folders, and class sub-folders without images, are refused.
                8-bit images are read as 0..255, 16-bit grey ones (PNG, TIFF) as 0..65535; all images must
                share one size and one bit depth
The held-out split is a fixed permutation seeded by `data.seed` (`data.test_fraction` of the images).
Every failure (missing path, bad shape, NaN, unreadable file) raises ValueError naming the input.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._imports import require
from .checks import check_finite

__all__ = ["ImageData", "IMAGE_DATASETS", "LAYOUTS", "LOADER_OPTIONS", "load_images", "load_digits", "load_npz", "load_image_folder",
           "split", "image_bin_width"]

IMAGE_DATASETS = ("digits", "npz", "image_folder")
LAYOUTS = ("NCHW", "NHWC")
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
    sk_digits = require("sklearn.datasets", "the digits data set").load_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return ImageData(x, torch.tensor(d.target, dtype=torch.long), 10, 17, "digits")


def _to_nchw(a: np.ndarray, where: str, layout: str | None = None) -> np.ndarray:
    """(N, H, W) or 4-D a -> (N, C, H, W); a 4-D array's layout is `layout`, or the one its shape allows."""
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"{where}: data.layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4:
        if layout is not None:
            return a if layout == "NCHW" else np.moveaxis(a, -1, 1)
        nchw, nhwc = a.shape[1] in (1, 3, 4), a.shape[-1] in (1, 3, 4)
        if nchw and nhwc:
            raise ValueError(f"{where}: images shaped {a.shape} read as (N, C, H, W) with {a.shape[1]} channel(s) of "
                             f"{a.shape[2]}x{a.shape[3]} or as (N, H, W, C) with {a.shape[3]} channel(s) of "
                             f"{a.shape[1]}x{a.shape[2]}; set data.layout: NCHW or NHWC")
        if nhwc:
            return np.moveaxis(a, -1, 1)
        if nchw:
            return a
        raise ValueError(f"{where}: images shaped {a.shape} have no channel axis of 1, 3 or 4 at position 1 or 3; "
                         "set data.layout: NCHW or NHWC if the channel count is right")
    raise ValueError(f"{where}: images must be shaped (N, H, W), (N, H, W, C) or (N, C, H, W); got {a.shape}")


def _scale(a: np.ndarray, value_range, where: str) -> tuple[Tensor, int | None]:
    """Map stored values to [-1, 1]; returns the tensor and the number of grey levels (None for floats)."""
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{where}: images must be integers or floats, got dtype {a.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    check_finite(x, where)
    levels = None
    if value_range is None:
        lo_x, hi_x = float(x.min()), float(x.max())
        if a.dtype == np.uint8:
            value_range = (0.0, 255.0)
        elif np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{where}: {a.dtype} images (values {lo_x:.6g}..{hi_x:.6g}) need data.value_range: [lo, hi], the "
                             "values that map to -1 and 1 (e.g. [0, 16] for 17 grey levels, [0, 65535] for 16 bits); only "
                             "uint8 is read as 0..255 without it")
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
    if np.issubdtype(a.dtype, np.integer) and lo.is_integer() and hi.is_integer():
        levels = int(hi - lo) + 1   # integer k sits at grey level k - lo
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


def load_npz(path: str | Path, x_key: str = "x", y_key: str | None = "y", value_range=None,
             layout: str | None = None) -> ImageData:
    """Images (and labels, when the file has y_key) from an .npz file; see the module docstring for layouts
    (layout: None | 'NCHW' | 'NHWC') and value ranges (value_range: [lo, hi] mapped to [-1, 1])."""
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
        a = _to_nchw(archive[x_key], f"{path}[{x_key!r}]", layout)
        y = archive[y_key] if y_key is not None and y_key in archive.files else None
    if a.shape[0] < 1:
        raise ValueError(f"npz data: {path}[{x_key!r}] holds no images")
    x, levels = _scale(a, value_range, f"{path}[{x_key!r}]")
    labels, k = _labels(y, a.shape[0], f"{path}[{y_key!r}]") if y is not None else (None, None)
    return ImageData(x, labels, k, levels, path.name)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _png_header(f: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, None for other files."""
    with open(f, "rb") as fh:
        head = fh.read(26)
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24], head[25]
    return None


def _read_image(f: Path, channels: int | None):
    """(array (H, W) or (H, W, 3), bits) of one image file: 8-bit images through PIL's conversion, 16-bit grey
    ones as uint16; channels None keeps grey as grey (the caller settles on one channel count)."""
    from PIL import Image

    png = _png_header(f) if f.suffix.lower() == ".png" else None
    if png is not None and png[0] == 16 and png[1] in (2, 4, 6):
        raise ValueError(f"image folder: {f} is a 16-bit colour PNG, which PIL reads as 8 bits; convert it to 8 bits, "
                         "or store the images in an .npz with data.value_range: [0, 65535]")
    with Image.open(f) as im:
        im.load()
        mode = im.mode
        if mode.startswith("I;16"):
            grey = np.asarray(im).astype(np.uint16)
            return (np.repeat(grey[..., None], 3, axis=-1) if channels == 3 else grey), 16
        if mode in ("I", "F"):
            raise ValueError(f"image folder: {f} holds 32-bit {'integer' if mode == 'I' else 'float'} pixels; only 8-bit "
                             "and 16-bit grey image files are read (use an .npz with data.value_range for others)")
        grey = mode in ("L", "1") or (mode == "P" and channels == 1)
        target = "L" if (channels == 1 or (channels is None and grey)) else "RGB"
        return np.asarray(im.convert(target)), 8


def load_image_folder(path: str | Path, channels: int | None = None) -> ImageData:
    """Images from a flat folder (unlabelled) or from one sub-folder per class; channels 1 or 3 (default: 1 if all
    are grey). Hidden files and folders are skipped; images beside class sub-folders and empty class sub-folders
    are refused, since either would silently change which images get which label."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"image folder: no folder at {path}")
    if channels not in (None, 1, 3):
        raise ValueError(f"image folder: channels must be 1 or 3, got {channels}")

    def images_in(d: Path) -> list[Path]:
        return sorted(f for f in d.iterdir() if f.is_file() and _visible(f) and f.suffix.lower() in _IMAGE_SUFFIXES)

    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and _visible(p))
    top = images_in(path)
    if subdirs and top:
        raise ValueError(f"image folder {path} holds images ({top[0].name}, ...) next to sub-folders "
                         f"({', '.join(d.name for d in subdirs[:5])}), which are read as classes: move every image into "
                         "its class sub-folder, or remove the sub-folders for unlabelled data")
    if subdirs:
        files = []
        for k, d in enumerate(subdirs):
            found = images_in(d)
            if not found:
                raise ValueError(f"image folder: class sub-folder {d} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))}); "
                                 "every sub-folder is a class, so it would shift the labels of the ones after it: "
                                 "remove it or fill it")
            files += [(f, k) for f in found]
    else:
        files = [(f, None) for f in top]
    if not files:
        raise ValueError(f"image folder: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {path} or its sub-folders")
    read = []
    for f, _ in files:
        try:
            read.append(_read_image(f, channels))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"image folder: cannot read {f}: {e}") from None
    bits = {b for _, b in read}
    if len(bits) > 1:
        f8 = next(f for (f, _), (_, b) in zip(files, read) if b == 8)
        f16 = next(f for (f, _), (_, b) in zip(files, read) if b == 16)
        raise ValueError(f"image folder: {f8} has 8 bits per pixel but {f16} has 16; all images must share one bit depth")
    arrays = [arr for arr, _ in read]
    if channels is None and any(arr.ndim == 3 for arr in arrays):   # some colour: read every grey image as RGB too
        arrays = [np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr for arr in arrays]
    size = arrays[0].shape
    for (f, _), arr in zip(files, arrays):
        if arr.shape[:2] != size[:2]:
            raise ValueError(f"image folder: {f} is {arr.shape[1]}x{arr.shape[0]}, but {files[0][0]} is {size[1]}x{size[0]}; "
                             "all images must share one size")
    a = np.stack(arrays)
    x, levels = _scale(a, (0, 255) if bits == {8} else (0, 65535), f"image folder {path}")
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


LOADER_OPTIONS = {"digits": (), "npz": ("x_key", "y_key"), "image_folder": ("channels",)}


def load_images(name: str, path: str | None = None, test_fraction: float = 0.2, seed: int = 0, layout: str | None = None,
                value_range=None, **options) -> tuple[ImageData, ImageData]:
    """(train, test) ImageData of the named source; layout and value_range apply to npz arrays, options
    (LOADER_OPTIONS[name]) go to the source's loader."""
    if name in LOADER_OPTIONS:
        unknown = [k for k in options if k not in LOADER_OPTIONS[name]]
        if unknown:
            raise ValueError(f"unknown data option 'data.options.{unknown[0]}' for data.name={name!r}; it takes "
                             f"{list(LOADER_OPTIONS[name]) or 'none'}" + ("; value_range and layout are data.value_range "
                             "and data.layout" if unknown[0] in ("value_range", "layout") else ""))
        if name != "npz" and (layout is not None or value_range is not None):
            raise ValueError(f"data.layout and data.value_range apply to data.name='npz', not {name!r}")
    if name == "digits":
        if path is not None:
            raise ValueError(f"digits ships with scikit-learn and takes no data.path, got path={path!r}")
        data = load_digits()
    elif name in ("npz", "image_folder"):
        if path is None:
            raise ValueError(f"data.name={name!r} needs data.path")
        data = load_npz(path, value_range=value_range, layout=layout, **options) if name == "npz" else load_image_folder(path, **options)
    else:
        raise ValueError(f"unknown image data set {name!r}; expected one of {IMAGE_DATASETS}")
    return split(data, test_fraction, seed)
