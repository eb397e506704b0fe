"""Image sample quality: Frechet distance on classifier features, memorisation, class accuracy, held-out bits/dim, grids.

FD (the FID recipe with the project's own digits classifier, sdekit.classifier, in place of Inception):
    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))
between Gaussian fits to the (N, F) features of two image sets. It is biased upwards at small N, so every
number here is reported next to a reference at the same N. Samples are compared with both splits:

  * against the held-out split (`fd_vs_test`), the number to judge a model by; its reference
    `fd_train_vs_test` is n training images against the held-out split (the mean of 5 draws, with the
    samples' classes when they were conditioned on labels; `fd_train_vs_test_sd` their spread): what a model
    that draws real images scores, and also what a model that copies its training images scores;
  * against the training split (`fd_vs_train`), next to `fd_test_vs_train` (held-out images against the
    training split; for conditional samples, 5 draws of held-out images with the samples' classes, at the
    largest n_fd_vs_train <= n the held-out split allows). This one rewards copying: a copy of 1000 training images scores
    0.44x the held-out
    split's FD. A ratio below 1 means "closer to the training set than fresh data are", not "better than
    perfect", and the classifier, fitted to the training split, makes its features of those very images special.

FD cannot tell a model that generalises from one that copies its data, hence `memorisation`: each sample's
nearest-neighbour distance to the training split (pixels, L2) against the same distance for held-out images.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._imports import pyplot

__all__ = ["frechet_distance", "features", "nearest_neighbour_distances", "memorisation", "evaluate_digits",
           "held_out_bits_per_dim", "save_image_grid", "class_grid_layout"]


def frechet_distance(fa: Tensor, fb: Tensor) -> float:
    """Frechet distance between Gaussian fits to features fa: (N, F) and fb: (M, F), in float64."""
    import scipy.linalg

    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1] or min(fa.shape[0], fb.shape[0]) < 2:
        raise ValueError(f"expected two (N, F) feature sets with N >= 2 and equal F, got {tuple(fa.shape)}, {tuple(fb.shape)}")
    a, b = fa.double().cpu().numpy(), fb.double().cpu().numpy()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or Inf (are the samples finite?)")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sa @ sb)
    if not np.isfinite(covmean).all():  # singular product: regularise as the FID reference code does
        eps = 1e-6 * np.eye(sa.shape[0])
        covmean = scipy.linalg.sqrtm((sa + eps) @ (sb + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


@torch.no_grad()
def features(classifier, x: Tensor, batch: int = 1000) -> Tensor:
    """Classifier features (N, F) of images x: (N, C, H, W), clamped to the data range [-1, 1] first."""
    return torch.cat([classifier.features(x[i:i + batch].clamp(-1, 1).float()) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def nearest_neighbour_distances(query: Tensor, reference: Tensor, batch: int = 512) -> Tensor:
    """(N,) Euclidean distance of each query image (N, *S) to its nearest reference image (M, *S), in float64."""
    if query.shape[1:] != reference.shape[1:] or reference.shape[0] < 1:
        raise ValueError(f"expected query (N, *S) and a non-empty reference (M, *S), got {tuple(query.shape)}, "
                         f"{tuple(reference.shape)}")
    ref = reference.flatten(1).double().cpu()
    return torch.cat([torch.cdist(query[i:i + batch].flatten(1).double().cpu(), ref).min(1).values
                      for i in range(0, query.shape[0], batch)]) if query.shape[0] else torch.empty(0, dtype=torch.float64)


@torch.no_grad()
def memorisation(samples: Tensor, train: Tensor, test: Tensor, quantile: float = 0.05, max_n: int = 2000) -> dict:
    """How close samples (N, *S) sit to the training split (M, *S), measured against held-out images (T, *S).

    d(x) is x's nearest-neighbour distance to the training split (pixels, L2). Held-out images are fresh
    data, so their d is what a model that generalises reaches; a model that copies reaches d = 0.
      nn_distance_ratio    median d(samples) / median d(held-out): about 1 for fresh data, 0 for copies
      near_copy_fraction   share of samples with d below the `quantile` (5%) quantile of d(held-out):
                           `quantile` for fresh data (sampling error `near_copy_fraction_se`), 1 for copies
      memorised            near_copy_fraction above `quantile` by more than 4 standard errors
    At most max_n samples and held-out images are used (the first ones).
    """
    samples, test = samples[:max_n], test[:max_n]
    if samples.shape[0] < 1 or test.shape[0] < 2:
        raise ValueError(f"memorisation needs samples and at least 2 held-out images, got {samples.shape[0]} and {test.shape[0]}")
    d_test = nearest_neighbour_distances(test, train)
    d_samples = nearest_neighbour_distances(samples.clamp(-1, 1), train)
    tau = float(torch.quantile(d_test, quantile))
    frac = float((d_samples < tau).double().mean())
    se = math.sqrt(quantile * (1 - quantile) * (1 / len(d_samples) + 1 / len(d_test)))
    return {"nn_distance_ratio": float(d_samples.median() / d_test.median()),
            "nn_distance_median": float(d_samples.median()), "nn_distance_median_held_out": float(d_test.median()),
            "near_copy_fraction": frac, "near_copy_fraction_fresh": quantile, "near_copy_fraction_se": se,
            "near_copy_distance": tau, "memorised": bool(frac > quantile + 4 * se),
            "n_memorisation": [len(d_samples), len(d_test)]}


REFERENCE_DRAWS = 5


def _reference_draw(train_labels: Tensor, labels: Tensor | None, n: int, seed: int) -> Tensor:
    """Indices of n training images drawn without replacement (seeded): with the classes `labels` (n,) when the
    samples were conditioned on them (a random draw of real images has multinomial class shares, and FD counts
    that mismatch against it), any n otherwise."""
    perm = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed))
    if labels is None:
        return perm[:n]
    pools = {int(c): perm[train_labels[perm] == c].tolist() for c in torch.unique(labels)}
    need = {c: int((labels == c).sum()) for c in pools}
    if any(len(pools[c]) < k for c, k in need.items()):
        return perm[:n]
    return torch.tensor([pools[int(c)].pop() for c in labels])


def _matched_size(pool_labels: Tensor, labels: Tensor, n: int) -> int:
    """The largest m <= n for which pool_labels hold every class of labels[:m] as often as labels[:m] do."""
    k = int(max(pool_labels.max(), labels.max())) + 1
    have = torch.bincount(pool_labels, minlength=k)
    for m in range(n, 1, -1):
        if bool((torch.bincount(labels[:m].to(pool_labels.device), minlength=k) <= have).all()):
            return m
    return n


@torch.no_grad()
def evaluate_digits(samples: Tensor, labels: Tensor | None = None, split_seed: int = 0, test_fraction: float = 0.2,
                    *, cache_dir: str | Path) -> dict:
    """FD of samples (N, 1, 8, 8) against the digits held-out split and against the training split, each with its
    reference at n = min(N, n_test) (module docstring); memorisation against the training split; class accuracy
    when labels (N,) are the classes the samples were conditioned on (pass None for unconditional samples,
    which get the class histogram only). The classifier is trained on the training split once and cached in
    cache_dir (for a run: sdekit.sampling.eval_cache_dir)."""
    from .classifier import digits_classifier
    from .images import load_images

    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 8, 8):
        raise ValueError(f"digits samples must be (N, 1, 8, 8), got {tuple(samples.shape)}")
    clf, record = digits_classifier(cache_dir, split_seed=split_seed, test_fraction=test_fraction)   # never trained on `test`
    train, test = load_images("digits", test_fraction=test_fraction, seed=split_seed)
    n = min(samples.shape[0], len(test))
    f_train, f_test, f_samples = features(clf, train.x), features(clf, test.x), features(clf, samples)
    noise = features(clf, torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(0)).clamp(-1, 1))
    fd_test = frechet_distance(f_samples[:n], f_test)
    refs = torch.tensor([frechet_distance(f_train[_reference_draw(train.labels, None if labels is None else labels[:n], n, seed)],
                                          f_test) for seed in range(REFERENCE_DRAWS)])
    fd_test_ref = float(refs.mean())
    m = n if labels is None else _matched_size(test.labels, labels, n)   # held-out images can match the samples' classes
    fd_train = frechet_distance(f_samples[:m], f_train)
    fd_train_ref = float(torch.tensor([frechet_distance(f_test[_reference_draw(test.labels, None if labels is None else labels[:m],
                                                                                 m, seed)], f_train)
                                       for seed in range(REFERENCE_DRAWS)]).mean())
    pred = clf(samples.clamp(-1, 1).float()).argmax(1)
    out = {"n_fd": n,
           "fd_vs_test": fd_test, "fd_train_vs_test": fd_test_ref, "fd_train_vs_test_sd": float(refs.std()),
           "fd_vs_test_ratio": fd_test / fd_test_ref,
           "fd_noise_vs_test": frechet_distance(noise, f_test),
           "n_fd_vs_train": m, "fd_vs_train": fd_train, "fd_test_vs_train": fd_train_ref, "fd_vs_train_ratio": fd_train / fd_train_ref,
           "fd_noise_vs_train": frechet_distance(noise, f_train),
           **memorisation(samples, train.x, test.x),
           "classifier_test_accuracy": record["test_accuracy"],
           "class_histogram": torch.bincount(pred, minlength=10).tolist()}
    if samples.shape[0] > n:
        out["n_all_samples"] = samples.shape[0]
        out["fd_vs_test_all_samples"] = frechet_distance(f_samples, f_test)
        out["fd_vs_train_all_samples"] = frechet_distance(f_samples, f_train)
    if labels is not None:
        out["class_accuracy"] = float((pred == labels.to(pred.device)).double().mean())
    return out


def held_out_bits_per_dim(score_fn, sde, x: Tensor, n_levels: int, generator: torch.Generator | None = None,
                          rtol: float = 1e-4, atol: float = 1e-4) -> dict:
    """Bits/dim of held-out images x: (N, *S) in [-1, 1] with n_levels grey levels (-1 + 2k/(n_levels-1)),
    by sdekit.log_likelihood (Hutchinson) at uniformly dequantised points; mean and standard error over images.

    The grey level k owns the bin [-1 + w (k - 1/2), -1 + w (k + 1/2)), w = 2 / (n_levels - 1), so the data
    range of the bins is (-1 - w/2, 1 + w/2), and bits/dim bounds -log2 P(k) / D (sdekit.likelihood.bits_per_dim).
    """
    from .likelihood import bits_per_dim, dequantize, log_likelihood

    w = 2.0 / (n_levels - 1)
    k = torch.round((x + 1) / w).long()
    if not torch.allclose(k.to(x.dtype) * w - 1, x, atol=1e-4):
        raise ValueError(f"held-out images do not sit on the {n_levels} grey levels; bits/dim needs quantised data")
    lo, hi = -1 - w / 2, 1 + w / 2
    y = dequantize(k, n_levels, (lo, hi), generator=generator, dtype=x.dtype)
    logp, info = log_likelihood(score_fn, sde, y, method="hutchinson", generator=generator, rtol=rtol, atol=atol,
                                return_info=True)
    bpd = bits_per_dim(logp, x[0].numel(), n_levels, (lo, hi))
    return {"bits_per_dim": float(bpd.mean()), "bits_per_dim_se": float(bpd.std() / math.sqrt(len(bpd))),
            "n_images": int(x.shape[0]), "nfe": int(info["nfe"]), "n_levels": n_levels,
            "uniform_bits_per_dim": math.log2(n_levels)}


def class_grid_layout(n: int, num_classes: int | None, max_shown: int = 100) -> tuple[int, int]:
    """(images shown, columns) for a grid of n samples whose labels are 0, 1, ..., K-1, 0, 1, ... (num_classes K):
    K columns, so that each column holds one class, and as many full rows as fit in max_shown (at least one);
    10 columns when the samples are unconditional (num_classes None)."""
    if num_classes is None:
        return min(n, max_shown), 10
    return min(n, num_classes * max(1, max_shown // num_classes)), num_classes


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 10, title: str = "", numbers: dict | None = None) -> None:
    """Save images (N, C, H, W) in [-1, 1] as one PNG grid (nrow per row) and, beside it, a JSON of `numbers`."""
    plt = pyplot("an image grid")

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    canvas = torch.ones(c, rows * (h + 1) + 1, ncol * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * ncol), max(3.0, 0.45 * rows) + (0.3 if title else 0)))
    if c == 1:
        ax.imshow(canvas[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(canvas[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps(numbers or {}, indent=1))
