"""Sample-quality measures against known answers: copies of the training set are flagged as memorised, fresh
held-out images are not; FD is reported against both splits; grids put one class per column."""
import pytest
import torch

from sdekit.image_metrics import class_grid_layout, evaluate_digits, memorisation, nearest_neighbour_distances
from sdekit.images import load_images


@pytest.fixture(scope="module")
def digits():
    return load_images("digits", test_fraction=0.2, seed=0)


def test_nearest_neighbour_distances_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    q, r = torch.randn(7, 1, 3, 3, generator=gen), torch.randn(11, 1, 3, 3, generator=gen)
    d = nearest_neighbour_distances(q, r, batch=3)
    brute = torch.tensor([min(float((a - b).pow(2).sum().sqrt()) for b in r) for a in q], dtype=torch.float64)
    torch.testing.assert_close(d, brute)
    assert nearest_neighbour_distances(r[4:6], r).abs().max() == 0


def test_memorisation_flags_copies_of_the_training_set_and_not_fresh_images(digits):
    """Held-out images split in two are fresh data for each other; training images are copies."""
    train, test = digits
    ref, fresh = test.x[:180], test.x[180:]
    fresh_m = memorisation(fresh, train.x, ref)
    assert not fresh_m["memorised"] and 0.8 < fresh_m["nn_distance_ratio"] < 1.25, fresh_m
    assert abs(fresh_m["near_copy_fraction"] - 0.05) < 4 * fresh_m["near_copy_fraction_se"], fresh_m
    copy = memorisation(train.x[:1000], train.x, ref)
    assert copy["memorised"] and copy["near_copy_fraction"] == 1 and copy["nn_distance_ratio"] == 0, copy
    # a model that copies a third of its samples and draws the rest fresh is flagged too
    third = memorisation(torch.cat([train.x[:90], fresh]), train.x, ref)
    assert third["memorised"] and third["near_copy_fraction"] > 0.3, third
    # lightly perturbed copies (noise 0.1 per pixel, about 0.8 in distance) are still near copies
    noisy = (train.x[:500] + 0.1 * torch.randn(train.x[:500].shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert memorisation(noisy, train.x, ref)["memorised"]


def test_fd_is_reported_against_the_held_out_split_and_copies_do_not_beat_fresh_data(digits, tmp_path_factory):
    """A copy of training images scores below the held-out split's FD against the training split (the trap), but
    about the fresh-data reference against the held-out split, and is flagged as memorised."""
    train, test = digits
    cache = tmp_path_factory.mktemp("clf")
    copy = evaluate_digits(train.x[:1000], cache_dir=cache)   # unconditional: no labels
    assert copy["fd_vs_train"] < 0.6 * copy["fd_test_vs_train"], copy                   # closer to train than fresh data
    assert 0.7 < copy["fd_vs_test_ratio"] < 1.3, copy                                    # no better than fresh data
    assert copy["memorised"] and "class_accuracy" not in copy, copy
    # conditional: the references are drawn with the samples' classes, and a copy stays level with them
    labelled = evaluate_digits(train.x[:1000], train.labels[:1000], cache_dir=cache)
    assert 0.7 < labelled["fd_vs_test_ratio"] < 1.3 and labelled["class_accuracy"] > 0.95, labelled
    noise = torch.rand((400, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 2 - 1
    bad = evaluate_digits(noise, cache_dir=cache)
    assert bad["fd_vs_test_ratio"] > 5 and not bad["memorised"] and "class_accuracy" not in bad, bad


@pytest.mark.parametrize("n, k", [(1000, 10), (1000, 3), (1000, 7), (50, 12), (5, 10), (1000, 150)])
def test_class_grid_puts_one_class_per_column(n, k):
    shown, ncol = class_grid_layout(n, k)
    labels = torch.arange(n) % k
    assert 1 <= shown <= min(n, max(100, k)) and ncol == k
    for i in range(shown):
        assert labels[i] == i % ncol                                 # column i % ncol of the grid holds class i % k
    assert class_grid_layout(n, None) == (min(n, 100), 10)


def test_fd_references_match_the_classes_of_conditional_samples(digits, tmp_path_factory):
    """Class-balanced real images score a lower FD than a random draw of real images (class shares differ by
    chance in the latter); the references for labelled samples are drawn with the same classes, so held-out
    images rebalanced to 0, 1, ..., 9, 0, ... score about the reference, not below it."""
    from sdekit.image_metrics import _reference_draw
    train, test = digits
    labels = torch.arange(250) % 10
    idx = _reference_draw(test.labels, labels, 250, seed=7)
    assert torch.equal(test.labels[idx], labels) and len(set(idx.tolist())) == 250
    m = evaluate_digits(test.x[idx], labels, cache_dir=tmp_path_factory.mktemp("clf"))
    assert m["n_fd_vs_train"] == 250 and 0.8 < m["fd_vs_train_ratio"] < 1.25, m
