"""Image data: digits, .npz arrays and image folders load into (N, C, H, W) in [-1, 1]; bad inputs give clear errors."""
import numpy as np
import pytest
import torch

from sdekit.config import ConfigError, load_config
from sdekit.data import load_dataset
from sdekit.images import load_image_folder, load_images, load_npz, split


def test_digits_split_is_fixed_disjoint_and_scaled():
    train, test = load_images("digits", test_fraction=0.2, seed=0)
    assert train.x.shape == (1438, 1, 8, 8) and test.x.shape == (359, 1, 8, 8)
    assert float(train.x.min()) == -1 and float(train.x.max()) == 1
    levels = torch.unique(torch.cat([train.x, test.x]))
    assert len(levels) == 17 and torch.allclose(levels, torch.arange(17) / 8 - 1)
    assert train.num_classes == 10 and sorted(torch.unique(test.labels).tolist()) == list(range(10))
    again, _ = load_images("digits", test_fraction=0.2, seed=0)
    assert torch.equal(again.x, train.x)
    other, _ = load_images("digits", test_fraction=0.2, seed=1)
    assert not torch.equal(other.x, train.x)
    assert torch.equal(load_dataset("digits", 0, seed=0), train.x)


def test_split_partitions_the_indices():
    from sdekit.images import ImageData
    data = ImageData(torch.arange(10.0).reshape(10, 1, 1, 1), torch.arange(10), 10, None, "toy")
    train, test = split(data, 0.3, seed=4)
    assert len(test) == 3 and sorted(torch.cat([train.labels, test.labels]).tolist()) == list(range(10))
    assert torch.equal(train.x.flatten().long(), train.labels)


def test_npz_layouts_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=nhwc, y=np.arange(5))
    d = load_npz(tmp_path / "rgb.npz")
    assert d.x.shape == (5, 3, 6, 4) and d.n_levels == 256 and d.num_classes == 5
    torch.testing.assert_close(d.x[2, 1], torch.tensor(nhwc[2, :, :, 1] / 127.5 - 1, dtype=torch.float32))
    np.savez(tmp_path / "grey.npz", images=rng.random((4, 8, 8)))
    g = load_npz(tmp_path / "grey.npz", x_key="images")
    assert g.x.shape == (4, 1, 8, 8) and g.labels is None and g.n_levels is None and g.x.min() >= -1
    np.savez(tmp_path / "nchw.npz", x=rng.random((4, 1, 5, 5)) * 2 - 1)
    assert load_npz(tmp_path / "nchw.npz").x.shape == (4, 1, 5, 5)


@pytest.mark.parametrize("arrays, match", [
    (dict(z=np.zeros((3, 8, 8))), "has no array 'x'"),
    (dict(x=np.zeros((3, 64))), r"must be shaped \(N, H, W\)"),
    (dict(x=np.full((3, 8, 8), np.nan)), "NaN"),
    (dict(x=np.full((3, 8, 8), 7.5)), "value_range"),
    (dict(x=np.zeros((3, 8, 8)), y=np.arange(4)), r"labels must be shaped \(3,\)"),
    (dict(x=np.zeros((3, 8, 8)), y=np.array([0.5, 1, 2])), "integers"),
    (dict(x=np.zeros((3, 8, 8)), y=np.array([0, -1, 2])), ">= 0"),
    (dict(x=np.zeros((0, 8, 8))), "no images"),
])
def test_npz_errors_name_the_problem(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_npz(tmp_path / "bad.npz")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="no file at"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="no folder at"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="needs data.path"):
        load_images("npz")
    with pytest.raises(ValueError, match="unknown image data set"):
        load_images("cifar")


def _png(path, array):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    for name in ["cat", "dog"]:
        for i in range(3):
            _png(tmp_path / name / f"{i}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    d = load_image_folder(tmp_path)
    assert d.x.shape == (6, 1, 6, 6) and d.labels.tolist() == [0, 0, 0, 1, 1, 1] and d.num_classes == 2
    rgb = load_image_folder(tmp_path, channels=3)
    assert rgb.x.shape == (6, 3, 6, 6)
    _png(tmp_path / "dog" / "big.png", np.zeros((7, 6), dtype=np.uint8))
    with pytest.raises(ValueError, match="all images must share one size"):
        load_image_folder(tmp_path)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*a.png"):
        load_image_folder(tmp_path / "broken")


def test_config_errors_for_image_training(tmp_path):
    from sdekit.training import train
    np.savez(tmp_path / "unlabelled.npz", x=np.zeros((20, 8, 8), dtype=np.uint8))
    cfg = load_config("configs/digits.yaml", ["data.name=npz", f"data.path={tmp_path / 'unlabelled.npz'}",
                                              f"train.out_dir={tmp_path / 'run'}", "train.steps=1"])
    with pytest.raises(ConfigError, match="has no labels"):
        train(cfg, progress=False)
    cfg = load_config("configs/digits.yaml", ["data.name=npz", f"data.path={tmp_path / 'missing.npz'}",
                                              f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="no file at"):
        train(cfg, progress=False)
    with pytest.raises(ConfigError, match="test_fraction"):
        load_config("configs/digits.yaml", ["data.test_fraction=1.5"])
    cfg = load_config("configs/ring.yaml", ["data.hflip=true", f"train.out_dir={tmp_path / 'ring'}"])
    with pytest.raises(ConfigError, match="image data sets"):
        train(cfg, progress=False)


def _png16(path, array):
    """A 16-bit PNG written byte by byte (colour type 0 grey, 2 RGB), so the test does not depend on PIL's writer."""
    import struct
    import zlib
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0 if array.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_image_folder_skips_hidden_folders_and_refuses_ambiguous_layouts(tmp_path):
    """An empty .ipynb_checkpoints/ is no class (labels stay 0, 0, 1, 1, 2, 2); images beside class folders and
    empty class folders are refused instead of dropping images or shifting labels."""
    rng = np.random.default_rng(2)
    for name in ["a", "b", "c"]:
        for i in range(2):
            _png(tmp_path / name / f"{i}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _png(tmp_path / "a" / ".hidden.png", np.zeros((4, 4), dtype=np.uint8))
    d = load_image_folder(tmp_path)
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2] and d.num_classes == 3 and len(d) == 6
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match=r"class sub-folder .*d holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "d").rmdir()
    _png(tmp_path / "stray.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"holds images \(stray.png, ...\) next to sub-folders \(a, b, c\)"):
        load_image_folder(tmp_path)


def test_npz_integer_arrays_other_than_uint8_need_a_value_range(tmp_path):
    """int64 values 0..16 are 17 grey levels, not a dark corner of 0..255: without data.value_range they are refused,
    with [0, 16] they map to -1 + k / 8 exactly."""
    k = np.arange(17, dtype=np.int64).reshape(1, 1, 17).repeat(3, axis=0)
    np.savez(tmp_path / "int.npz", x=k)
    with pytest.raises(ValueError, match=r"int64 images \(values 0..16\) need data.value_range"):
        load_npz(tmp_path / "int.npz")
    d = load_npz(tmp_path / "int.npz", value_range=[0, 16])
    torch.testing.assert_close(d.x[0, 0, 0], torch.arange(17) / 8.0 - 1)
    assert d.n_levels == 17
    np.savez(tmp_path / "u16.npz", x=np.array([[[0, 1000], [40000, 65535]]], dtype=np.uint16))
    with pytest.raises(ValueError, match="uint16 images .* need data.value_range"):
        load_npz(tmp_path / "u16.npz")
    np.savez(tmp_path / "u8.npz", x=np.array([[[0, 255]]], dtype=np.uint8))        # uint8 is read as 0..255 without it
    assert load_npz(tmp_path / "u8.npz").x.flatten().tolist() == [-1.0, 1.0]


def test_npz_layout_must_be_given_when_the_shape_allows_two(tmp_path):
    """(5, 1, 8, 4) is one channel of 8x4 or four channels of 1x8: refused without data.layout, read as told with it."""
    a = np.random.default_rng(3).integers(0, 256, (5, 1, 8, 4), dtype=np.uint8)
    np.savez(tmp_path / "amb.npz", x=a)
    with pytest.raises(ValueError, match=r"read as \(N, C, H, W\) with 1 channel\(s\) of 8x4 or as \(N, H, W, C\) with 4 "
                                         r"channel\(s\) of 1x8; set data.layout"):
        load_npz(tmp_path / "amb.npz")
    nchw = load_npz(tmp_path / "amb.npz", layout="NCHW")
    assert nchw.x.shape == (5, 1, 8, 4)
    torch.testing.assert_close(nchw.x, torch.tensor(a / 127.5 - 1, dtype=torch.float32))
    nhwc = load_npz(tmp_path / "amb.npz", layout="NHWC")
    assert nhwc.x.shape == (5, 4, 1, 8)
    torch.testing.assert_close(nhwc.x[:, 2], torch.tensor(a[..., 2] / 127.5 - 1, dtype=torch.float32))
    np.savez(tmp_path / "none.npz", x=np.zeros((5, 8, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="no channel axis of 1, 3 or 4"):
        load_npz(tmp_path / "none.npz")


def test_16_bit_pngs_keep_their_values(tmp_path):
    """[0, 1000, 40000, 65535] in a 16-bit grey PNG load as -1 + 2 v / 65535 (65536 levels), not clipped to 8 bits;
    16-bit colour PNGs (which PIL reads as 8 bits) and mixed bit depths are refused."""
    v = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    _png16(tmp_path / "grey" / "a.png", v)
    d = load_image_folder(tmp_path / "grey")
    torch.testing.assert_close(d.x[0, 0], torch.tensor(2 * v.astype(np.float64) / 65535 - 1, dtype=torch.float32))
    assert d.n_levels == 65536
    rgb = load_image_folder(tmp_path / "grey", channels=3)
    assert rgb.x.shape == (1, 3, 2, 2) and torch.equal(rgb.x[0, 1], d.x[0, 0])
    _png(tmp_path / "grey" / "b.png", np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="has 8 bits per pixel but .*a.png has 16"):
        load_image_folder(tmp_path / "grey")
    _png16(tmp_path / "colour" / "c.png", np.stack([v, v, v], axis=-1))
    with pytest.raises(ValueError, match="16-bit colour PNG"):
        load_image_folder(tmp_path / "colour")


def test_layout_and_value_range_are_typed_config_fields(tmp_path):
    from sdekit.data import load_training_data
    for override, match in [("data.layout=NWHC", "data.layout = 'NWHC' is not allowed"),
                            ("data.value_range=[16, 0]", r"data.value_range must be \[lo, hi\]"),
                            ("data.value_range=[0, x]", r"data.value_range: \[0, .x.\] has the wrong type"),
                            ("data.options.value_range=[0, 16]", "unknown data option 'data.options.value_range'.*use data.value_range"),
                            ("data.options.chanels=1", "unknown data option 'data.options.chanels'")]:
        with pytest.raises(ConfigError, match=match):
            load_config("configs/digits.yaml", ["data.name=npz", f"data.path={tmp_path}/x.npz", override])
    with pytest.raises(ConfigError, match="data.layout applies to data.name='npz'"):
        load_config("configs/digits.yaml", ["data.layout=NCHW"])
    np.savez(tmp_path / "int.npz", x=np.arange(16 * 64, dtype=np.int32).reshape(16, 8, 8) % 17, y=np.arange(16) % 10)
    cfg = load_config("configs/digits.yaml", ["data.name=npz", f"data.path={tmp_path / 'int.npz'}", "data.value_range=[0, 16]"])
    x, labels, info = load_training_data(cfg.data)
    assert info["n_levels"] == 17 and float(x.min()) == -1 and float(x.max()) == 1 and labels is not None
