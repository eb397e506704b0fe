"""Data: Gaussian mixtures with exact densities and exact diffused scores, and toy 2-D sets.

A Gaussian mixture pushed through a linear-Gaussian SDE stays a Gaussian mixture:
p_t = sum_k w_k N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I). Its score is therefore known in
closed form at every t, which makes it the oracle every sampler and likelihood test leans on.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .checks import check_finite
from .sde import SDE, _as_tensor

__all__ = ["GaussianMixture", "ring", "grid", "two_moons", "swiss_roll", "checkerboard", "pinwheel",
           "TOY_DATASETS", "EXACT_MIXTURES", "make_toy", "load_dataset", "load_training_data", "check_finite"]


class GaussianMixture:
    """Mixture of K full-covariance Gaussians in d dimensions.

    means: (K, d); covs: (K, d, d), (K, d) diagonal, (K,) or a float for isotropic; weights: (K,), normalised here.
    """

    def __init__(self, means, covs, weights=None):
        means = torch.as_tensor(means, dtype=torch.get_default_dtype()) if not isinstance(means, Tensor) else means
        if means.ndim != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(means.shape)}")
        K, d = means.shape
        covs = _as_tensor(covs, means)
        if covs.ndim == 0:
            covs = covs * torch.eye(d, dtype=means.dtype).expand(K, d, d)
        elif covs.ndim == 1:
            if covs.shape[0] != K:
                raise ValueError(f"isotropic covs must be (K,)={K}, got {tuple(covs.shape)}")
            covs = covs[:, None, None] * torch.eye(d, dtype=means.dtype)
        elif covs.ndim == 2:
            if covs.shape != (K, d):
                raise ValueError(f"diagonal covs must be (K, d)=({K}, {d}), got {tuple(covs.shape)}")
            covs = torch.diag_embed(covs)
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must be (K, d, d)=({K}, {d}, {d}), got {tuple(covs.shape)}")
        weights = torch.full((K,), 1.0 / K, dtype=means.dtype) if weights is None else _as_tensor(weights, means)
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be (K,)={K} non-negative with positive sum, got {weights}")
        self.means, self.covs = means, covs.to(means.dtype).contiguous()
        self.weights = (weights / weights.sum()).to(means.dtype)
        self._chol = torch.linalg.cholesky(self.covs)  # raises if a covariance is not positive definite

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def to(self, dtype: torch.dtype | None = None, device=None) -> GaussianMixture:
        return GaussianMixture(self.means.to(dtype=dtype, device=device), self.covs.to(dtype=dtype, device=device),
                               self.weights.to(dtype=dtype, device=device))

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n samples: (n, d) (and their component labels (n,) when return_labels)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        x = self.means[labels] + (self._chol[labels] @ z.unsqueeze(-1)).squeeze(-1)
        return (x, labels) if return_labels else x

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        mu = self.mean()
        dev = self.means - mu
        return torch.einsum("k,kij->ij", self.weights, self.covs + dev[:, :, None] * dev[:, None, :])

    # --- densities at t, possibly different per sample ------------------------------------------
    def _diffused(self, x: Tensor, t, sde: SDE | None):
        """Per-sample component means (B|1, K, d) and Cholesky factors (B|1, K, d, d) of p_t."""
        means, covs = self.means.to(x), self.covs.to(x)
        if sde is None:
            return means[None], torch.linalg.cholesky(covs)[None]
        alpha, sigma = sde.marginal(_as_tensor(t, x).to(x))
        alpha, sigma = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        cov_t = alpha**2 * covs + sigma**2 * eye
        return alpha[..., 0] * means, torch.linalg.cholesky(cov_t)

    def _component_terms(self, x: Tensor, t=None, sde: SDE | None = None):
        """log w_k N(x; m_k, C_k): (B, K) and the whitened residuals needed by the score."""
        m, L = self._diffused(x, t, sde)
        diff = x[:, None, :] - m                                   # (B, K, d)
        L = L.expand(x.shape[0], -1, -1, -1)
        z = torch.linalg.solve_triangular(L, diff.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        log_comp = -0.5 * (z**2).sum(-1) - 0.5 * logdet - 0.5 * self.dim * math.log(2 * math.pi)
        return log_comp + torch.log(self.weights.to(x)), z, L

    def log_prob(self, x: Tensor, t=None, sde: SDE | None = None) -> Tensor:
        """log p(x) (or log p_t(x) under sde). x: (B, d); t: () or (B,) -> (B,)."""
        self._check(x)
        log_terms, _, _ = self._component_terms(x, t, sde)
        return torch.logsumexp(log_terms, dim=1)

    def responsibilities(self, x: Tensor, t=None, sde: SDE | None = None) -> Tensor:
        """Posterior component probabilities (B, K)."""
        self._check(x)
        log_terms, _, _ = self._component_terms(x, t, sde)
        return torch.softmax(log_terms, dim=1)

    def score(self, x: Tensor, t=None, sde: SDE | None = None) -> Tensor:
        """Exact grad_x log p_t(x) under sde (the data score if sde is None). x: (B, d); t: () or (B,) -> (B, d)."""
        self._check(x)
        log_terms, z, L = self._component_terms(x, t, sde)
        r = torch.softmax(log_terms, dim=1)                        # (B, K)
        # C^{-1}(x - m) = L^{-T} z
        prec_diff = torch.linalg.solve_triangular(L.transpose(-1, -2), z.unsqueeze(-1), upper=True).squeeze(-1)
        return -(r.unsqueeze(-1) * prec_diff).sum(1)

    def score_fn(self, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact marginal score as a `score_fn(x, t)` for samplers and likelihoods."""
        return lambda x, t: self.score(x, t, sde)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (B, {self.dim}) for this {self.dim}-d mixture, got {tuple(x.shape)}")


# --- toy 2-D sets ----------------------------------------------------------------------------------
def ring(n_modes: int = 8, radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """n_modes equal-weight isotropic Gaussians on a circle (an exact-density mixture)."""
    angles = torch.arange(n_modes, dtype=torch.get_default_dtype()) * (2 * math.pi / n_modes)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    return GaussianMixture(means, torch.full((n_modes,), std**2))


def grid(side: int = 5, spacing: float = 1.0, std: float = 0.05) -> GaussianMixture:
    """side x side equal-weight Gaussians on a centred square grid."""
    ticks = (torch.arange(side, dtype=torch.get_default_dtype()) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(ticks, ticks)
    return GaussianMixture(means, torch.full((side * side,), std**2))


def two_moons(n: int, noise: float = 0.05, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaving half circles, standardised to roughly unit scale. -> (n, 2)"""
    u = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(u), 1 - torch.cos(u))
    y = torch.where(upper, torch.sin(u), 0.5 - torch.sin(u))
    pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.5
    return pts + noise * torch.randn(n, 2, generator=generator)


def swiss_roll(n: int, noise: float = 0.05, generator: torch.Generator | None = None) -> Tensor:
    """A 2-D swiss roll scaled to about [-2, 2]^2. -> (n, 2)"""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 7.0
    return pts + noise * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the 8 dark squares of a 4x4 board over [-2, 2]^2 (density 1/8 there, 0 elsewhere). -> (n, 2)"""
    x1 = torch.rand(n, generator=generator) * 4 - 2
    x2 = torch.rand(n, generator=generator) * 2 - 2 + 2 * (torch.floor(x1) % 2)
    x2 = x2 + 2 * (torch.randint(0, 2, (n,), generator=generator))
    x2 = (x2 + 2) % 4 - 2
    return torch.stack([x1, x2], 1)


def pinwheel(n: int, n_arms: int = 5, radial_std: float = 0.3, tangential_std: float = 0.1, rate: float = 0.25,
             generator: torch.Generator | None = None) -> Tensor:
    """Spiralling arms (Johnson et al. 2016). -> (n, 2)"""
    arm = torch.randint(0, n_arms, (n,), generator=generator)
    feats = torch.randn(n, 2, generator=generator) * torch.tensor([radial_std, tangential_std]) + torch.tensor([1.0, 0.0])
    angle = arm * (2 * math.pi / n_arms) + rate * torch.exp(feats[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    return 2 * (rot @ feats.unsqueeze(-1)).squeeze(-1)


TOY_DATASETS: dict[str, Callable] = {
    "ring": lambda n, generator=None, **kw: ring(**kw).sample(n, generator=generator),
    "grid": lambda n, generator=None, **kw: grid(**kw).sample(n, generator=generator),
    "two_moons": two_moons, "swiss_roll": swiss_roll, "checkerboard": checkerboard, "pinwheel": pinwheel,
}
EXACT_MIXTURES: dict[str, Callable[..., GaussianMixture]] = {"ring": ring, "grid": grid}


def make_toy(name: str, n: int, generator: torch.Generator | None = None, **kwargs) -> Tensor:
    """n samples (n, 2) of the named toy set."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; expected one of {sorted(TOY_DATASETS)}")
    return TOY_DATASETS[name](n, generator=generator, **kwargs)


def load_dataset(name: str, n: int, seed: int = 0, path: str | None = None, test_fraction: float = 0.2,
                 **options) -> Tensor:
    """A training set as one tensor (N, *S): toy sets are drawn once with `seed` so that a run sees fixed data;
    image sets (sdekit.images) return their training split (all of it; n is ignored), split by `seed`.

    Raises on unknown names and on non-finite values, before any training starts.
    """
    from .images import IMAGE_DATASETS, load_images

    if name in TOY_DATASETS:
        x = make_toy(name, n, generator=torch.Generator().manual_seed(seed), **options)
    elif name in IMAGE_DATASETS:
        x = load_images(name, path, test_fraction, seed, **options)[0].x
    else:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(TOY_DATASETS) + list(IMAGE_DATASETS)}")
    check_finite(x, f"data set {name!r}")
    return x


def load_training_data(cfg) -> tuple[Tensor, Tensor | None, dict]:
    """(x: (N, *S), labels: (N,) long or None, info) for a DataConfig; info holds 'num_classes' and 'n_levels'
    (image sets) so that training can condition on labels and dequantise."""
    from .images import IMAGE_DATASETS, load_images

    if cfg.name in IMAGE_DATASETS:
        train, _ = load_images(cfg.name, cfg.path, cfg.test_fraction, cfg.seed, cfg.layout, cfg.value_range, **cfg.options)
        return train.x, train.labels, {"num_classes": train.num_classes, "n_levels": train.n_levels}
    if cfg.hflip or cfg.dequantize or cfg.layout is not None or cfg.value_range is not None:
        raise ValueError(f"data.hflip, data.dequantize, data.layout and data.value_range apply to image data sets, not {cfg.name!r}")
    return load_dataset(cfg.name, cfg.n_train, cfg.seed, cfg.path, **cfg.options), None, {}
