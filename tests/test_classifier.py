"""The project's digits classifier (trained here, from a seed) and the Frechet distance on its features."""
import numpy as np
import pytest
import torch

from sdekit.classifier import digits_classifier
from sdekit.image_metrics import features, frechet_distance
from sdekit.images import load_images


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return digits_classifier(tmp_path_factory.mktemp("clf"))


def test_classifier_reaches_stated_accuracy_and_is_cached(classifier, tmp_path_factory):
    model, record = classifier
    _, test = load_images("digits", test_fraction=0.2, seed=0)
    with torch.no_grad():
        acc = float((model(test.x).argmax(1) == test.labels).double().mean())
    assert acc == pytest.approx(record["test_accuracy"]) and acc >= 0.95, acc   # README states 0.978


def test_frechet_distance_matches_the_gaussian_closed_form():
    gen = np.random.default_rng(0)
    d, n = 3, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0])
    s1, s2 = np.diag([1.0, 2.0, 0.5]), np.diag([0.5, 1.0, 1.0])
    a = torch.tensor(gen.multivariate_normal(mu1, s1, n))
    b = torch.tensor(gen.multivariate_normal(mu2, s2, n))
    exact = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.sqrt(s1 @ s2)))   # diagonal: sqrtm is elementwise
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)
    assert frechet_distance(a[:1000], a[:1000]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a[:, :2], b)


def test_fd_of_held_out_digits_is_far_below_noise(classifier):
    model, _ = classifier
    train, test = load_images("digits", test_fraction=0.2, seed=0)
    f_train = features(model, train.x)
    fd_test = frechet_distance(features(model, test.x), f_train)
    noise = torch.randn(test.x.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    fd_noise = frechet_distance(features(model, noise), f_train)
    blurred = torch.nn.functional.avg_pool2d(test.x, 3, stride=1, padding=1, count_include_pad=False)
    fd_blur = frechet_distance(features(model, blurred), f_train)
    assert fd_test < 0.15 * fd_noise, (fd_test, fd_noise)
    assert fd_test < fd_blur < fd_noise, (fd_test, fd_blur, fd_noise)   # the distance orders degradations


def test_classifier_trains_on_the_judged_runs_training_split(tmp_path, monkeypatch):
    """FD for a run with data.seed=3 uses a classifier that never saw that run's held-out images."""
    import sdekit.classifier as C
    from sdekit.image_metrics import evaluate_digits
    seen = {}

    class Stop(Exception):
        pass

    def capture(x, y, *args, **kwargs):
        seen["x"] = x
        raise Stop
    monkeypatch.setattr(C, "train_classifier", capture)
    with pytest.raises(Stop):
        evaluate_digits(torch.zeros(4, 1, 8, 8), split_seed=3, test_fraction=0.25, cache_dir=tmp_path)
    train, _ = load_images("digits", test_fraction=0.25, seed=3)
    assert torch.equal(seen["x"], train.x)
