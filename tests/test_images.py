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
    for k, name in enumerate(["cat", "dog"]):
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
