"""Image sample quality: Frechet distance on classifier features, class accuracy, held-out bits/dim, image grids.

FD (the FID recipe with the project's own digits classifier, sdekit.classifier, in place of Inception):
    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))
between Gaussian fits to the (N, F) features of two image sets. It is biased upwards at small N, so every
number here is reported next to its references at the same N: the held-out split against the training
split (the floor a perfect model reaches) and pure noise against the training split.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["frechet_distance", "features", "evaluate_digits", "held_out_bits_per_dim", "save_image_grid"]


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
def evaluate_digits(samples: Tensor, labels: Tensor | None = None, split_seed: int = 0, test_fraction: float = 0.2,
                    cache_dir: str | Path = "runs/classifier") -> dict:
    """FD of samples (N, 1, 8, 8) against the digits training split, with the references at the held-out size
    n = min(N, n_test): FD(test, train) and FD(noise, train); class accuracy when labels (N,) are the classes
    the samples were conditioned on, and the class histogram of the samples otherwise."""
    from .classifier import digits_classifier
    from .images import load_images

    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 8, 8):
        raise ValueError(f"digits samples must be (N, 1, 8, 8), got {tuple(samples.shape)}")
    clf, record = digits_classifier(cache_dir, split_seed=split_seed, test_fraction=test_fraction)   # never trained on `test`
    train, test = load_images("digits", test_fraction=test_fraction, seed=split_seed)
    n = min(samples.shape[0], len(test))
    f_train = features(clf, train.x)
    f_samples = features(clf, samples)
    noise = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    fd = frechet_distance(f_samples[:n], f_train)
    fd_ref = frechet_distance(features(clf, test.x[:n]), f_train)
    pred = clf(samples.clamp(-1, 1).float()).argmax(1)
    out = {"n_fd": n, "fd": fd, "fd_test_vs_train": fd_ref, "fd_ratio": fd / fd_ref,
           "fd_noise_vs_train": frechet_distance(features(clf, noise), f_train),
           "classifier_test_accuracy": record["test_accuracy"],
           "class_histogram": torch.bincount(pred, minlength=10).tolist()}
    if samples.shape[0] > n:
        out["fd_all_samples"] = frechet_distance(f_samples, f_train)
        out["n_all_samples"] = samples.shape[0]
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


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 10, title: str = "", numbers: dict | None = None) -> None:
    """Save images (N, C, H, W) in [-1, 1] as one PNG grid (nrow per row) and, beside it, a JSON of `numbers`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
