"""Change of variables: the density of a pushed-forward sample, checked against a histogram and a closed form.

A sample is drawn the pathwise way, x = T(z) with z ~ N(0, I) and T an invertible map, here the two-layer
flow T(z) = tanh(A z + b) (an affine layer, then an elementwise tanh) on R^2 -> (-1, 1)^2. Its density is

    p_x(x) = p_z(T^-1(x)) / |det dT/dz (T^-1(x))|                     (change of variables)

computed generically: the inverse T^-1(x) = A^-1 (atanh(x) - b) and the Jacobian determinant by autograd
(torch.func.jacrev), so nothing about tanh or A is used twice. Three checks:

  closed form   y = A z + b ~ N(b, A A^T) and x = tanh(y), so p_x(x) = N(atanh x; b, A A^T) / prod_i (1 - x_i^2);
                the two log-densities agree at every sample to round-off (float64)
  histogram     a chi-square test of n samples in a grid of bins over (-1, 1)^2 against bin probabilities
                integrated from the flow's density (Gauss-Legendre in each bin; bins expecting fewer than 5
                counts pooled), and a Kolmogorov-Smirnov test of each marginal against its exact CDF
                Phi((atanh x_i - b_i) / s_i); tolerance: p-value above 0.001 (a correct density fails one such test
                with probability 0.001; the seed is fixed)
  the Jacobian matters   the same chi-square with the Jacobian left out (p_z(T^-1(x)), normalised numerically)
                is rejected outright

    .venv/bin/python examples/change_of_variables.py            # a few seconds
    .venv/bin/python examples/change_of_variables.py --n 20000

Writes --out/change_of_variables.png (samples with the density's contours, a marginal histogram with the
density with and without the Jacobian) and change_of_variables.json.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import Tensor

DTYPE = torch.float64
A = torch.tensor([[0.8, 0.0], [0.5, 0.6]], dtype=DTYPE)
B = torch.tensor([0.3, -0.2], dtype=DTYPE)


def forward(z: Tensor, a: Tensor = A, b: Tensor = B) -> Tensor:
    """x = T(z) = tanh(A z + b): (..., 2) -> (..., 2)."""
    return torch.tanh(z @ a.T + b)


def inverse(x: Tensor, a: Tensor = A, b: Tensor = B) -> Tensor:
    """z = T^-1(x) = A^-1 (atanh(x) - b): (..., 2) -> (..., 2)."""
    return torch.linalg.solve(a, (torch.atanh(x) - b).unsqueeze(-1)).squeeze(-1)


def base_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I): (..., d) -> (...)."""
    return -0.5 * (z ** 2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def flow_log_density(x: Tensor, fwd=forward, inv=inverse) -> Tensor:
    """log p_x(x) = log p_z(T^-1(x)) - log |det dT/dz| at z = T^-1(x), the Jacobian by autograd: (N, d) -> (N,)."""
    z = inv(x)
    jac = torch.func.vmap(torch.func.jacrev(fwd))(z)                       # (N, d, d)
    return base_log_prob(z) - torch.linalg.slogdet(jac)[1]


def closed_form_log_density(x: Tensor, a: Tensor = A, b: Tensor = B) -> Tensor:
    """log N(atanh x; b, A A^T) - sum_i log(1 - x_i^2): (N, 2) -> (N,)."""
    y = torch.atanh(x)
    gauss = torch.distributions.MultivariateNormal(b, covariance_matrix=a @ a.T)
    return gauss.log_prob(y) - torch.log1p(-x ** 2).sum(-1)


def marginal_cdf(x: Tensor, i: int, a: Tensor = A, b: Tensor = B) -> Tensor:
    """P(x_i <= x) = Phi((atanh x - b_i) / s_i), s_i^2 = (A A^T)_ii."""
    s = torch.sqrt((a @ a.T)[i, i])
    return torch.special.ndtr((torch.atanh(x) - b[i]) / s)


def bin_probabilities(log_density, edges: Tensor, nodes: int = 8) -> Tensor:
    """Integral of exp(log_density) over every bin of the grid edges x edges: (nb, nb), by nodes x nodes
    Gauss-Legendre points per bin (exact enough for a smooth density: the sum over all bins is checked)."""
    g, w = np.polynomial.legendre.leggauss(nodes)
    g, w = torch.tensor(g, dtype=DTYPE), torch.tensor(w, dtype=DTYPE)
    lo, hi = edges[:-1], edges[1:]
    pts = (lo[:, None] + (hi - lo)[:, None] * (g + 1) / 2).reshape(-1)      # (nb * nodes,)
    wts = ((hi - lo)[:, None] / 2 * w).reshape(-1)
    X1, X2 = torch.meshgrid(pts, pts, indexing="ij")
    dens = torch.exp(log_density(torch.stack([X1.reshape(-1), X2.reshape(-1)], -1))).reshape(X1.shape)
    nb = len(edges) - 1
    return (dens * wts[:, None] * wts[None, :]).reshape(nb, nodes, nb, nodes).sum((1, 3))


def chi_square(x: Tensor, probs: Tensor, edges: Tensor, min_expected: float = 5.0) -> dict:
    """Pearson's chi-square of the 2-D histogram of x: (N, 2) against bin probabilities probs: (nb, nb); bins
    expecting fewer than min_expected counts are pooled into one. Returns statistic, degrees of freedom, p-value."""
    nb = len(edges) - 1
    idx = (torch.bucketize(x.contiguous(), edges) - 1).clamp(0, nb - 1)
    counts = torch.zeros(nb, nb, dtype=DTYPE).index_put_((idx[:, 0], idx[:, 1]), torch.ones(len(x), dtype=DTYPE),
                                                         accumulate=True)
    expected = probs / probs.sum() * len(x)
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp_ = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp_ > 0
    stat = (((obs - exp_) ** 2)[keep] / exp_[keep]).sum().item()
    dof = int(keep.sum()) - 1
    return {"statistic": stat, "dof": dof, "p_value": float(stats.chi2.sf(stat, dof)), "bins": int(keep.sum())}


def run(n: int = 100_000, bins: int = 12, seed: int = 0) -> dict:
    """Draw n samples x = T(z), compare the flow's density with the closed form at every sample, and test the
    histogram against it (and against the density without the Jacobian). Returns the numbers and the samples."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=gen, dtype=DTYPE)
    x = forward(z)
    x = x.clamp(-1 + 1e-15, 1 - 1e-15)                    # atanh(+-1) would be infinite; tanh in float64 can reach 1
    lp_flow, lp_closed = flow_log_density(x), closed_form_log_density(x)
    # the inverse is exact: T^-1(T(z)) = z
    roundtrip = (inverse(x) - z).abs().max().item()
    edges = torch.linspace(-1, 1, bins + 1, dtype=DTYPE)
    probs = bin_probabilities(flow_log_density, edges)
    wrong = bin_probabilities(lambda x: base_log_prob(inverse(x)), edges)          # the Jacobian left out
    ks = [stats.kstest(x[:, i].numpy(), lambda v, i=i: marginal_cdf(torch.as_tensor(v, dtype=DTYPE), i).numpy())
          for i in range(2)]
    return {
        "n": n, "bins": bins, "seed": seed, "A": A.tolist(), "b": B.tolist(),
        "max_abs_log_density_difference": (lp_flow - lp_closed).abs().max().item(),
        "roundtrip_error": roundtrip,
        "total_probability": probs.sum().item(),
        "chi_square": chi_square(x, probs, edges),
        "chi_square_without_jacobian": chi_square(x, wrong, edges),
        "without_jacobian_total": wrong.sum().item(),
        "ks": [{"statistic": float(k.statistic), "p_value": float(k.pvalue)} for k in ks],
        "_x": x, "_edges": edges,
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = res["_x"].numpy()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    ax[0].hist2d(x[:, 0], x[:, 1], bins=60, range=[[-1, 1], [-1, 1]], cmap="Greys")
    g = torch.linspace(-0.995, 0.995, 200, dtype=DTYPE)
    G1, G2 = torch.meshgrid(g, g, indexing="ij")
    dens = torch.exp(flow_log_density(torch.stack([G1.reshape(-1), G2.reshape(-1)], -1))).reshape(G1.shape)
    ax[0].contour(G1.numpy(), G2.numpy(), dens.numpy(), levels=8, colors="C1", linewidths=1)
    ax[0].set(title="x = tanh(A z + b): samples and p_x (contours)", xlabel="x1", ylabel="x2", aspect="equal")
    ax[1].hist(x[:, 0], bins=80, range=(-1, 1), density=True, color="0.75", label=f"samples (n = {res['n']})")
    s = torch.sqrt((A @ A.T)[0, 0])
    y = torch.atanh(g)
    normal = torch.exp(-0.5 * ((y - B[0]) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    # the legend spells the change of variables out: the normal density of y = atanh x1, times |dy/dx1|
    ax[1].plot(g, normal / (1 - g ** 2), "C1",
               label=r"$p(x_1) = \mathcal{N}(\mathrm{atanh}\,x_1;\ b_1, s^2) \cdot \frac{1}{1 - x_1^2}$")
    ax[1].plot(g, normal, "C3--", label=r"$\mathcal{N}(\mathrm{atanh}\,x_1;\ b_1, s^2)$ alone: Jacobian left out")
    c = res["chi_square"]
    ax[1].set(title=f"marginal of x1 (2-D chi-square p = {c['p_value']:.2f}, KS p = {res['ks'][0]['p_value']:.2f})",
              xlabel="x1")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="samples")
    p.add_argument("--bins", type=int, default=12, help="bins per axis of the chi-square grid over (-1, 1)^2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/change_of_variables")
    args = p.parse_args(argv)
    if args.n < 100 or args.bins < 2:
        p.error("--n must be >= 100 and --bins >= 2")
    res = run(args.n, args.bins, args.seed)
    c, w = res["chi_square"], res["chi_square_without_jacobian"]
    print(f"x = tanh(A z + b), z ~ N(0, I_2), A = {res['A']}, b = {res['b']}, n = {args.n}")
    print(f"flow log-density (autograd Jacobian) vs closed form N(atanh x; b, AA^T) / prod(1 - x^2):"
          f" max |difference| = {res['max_abs_log_density_difference']:.2e} over the n samples;"
          f" inverse round trip {res['roundtrip_error']:.1e}")
    print(f"integral of the flow density over (-1, 1)^2 (Gauss-Legendre, {args.bins}x{args.bins} bins): {res['total_probability']:.6f}")
    print(f"chi-square, histogram vs flow density: {c['statistic']:.1f} on {c['dof']} dof, p = {c['p_value']:.3f}"
          "  (pass: p > 0.001)")
    for i, k in enumerate(res["ks"]):
        print(f"Kolmogorov-Smirnov, x{i + 1} vs its exact marginal CDF: D = {k['statistic']:.4f}, p = {k['p_value']:.3f}")
    print(f"without the Jacobian (p_z(T^-1(x)), integral {res['without_jacobian_total']:.3f}, normalised):"
          f" chi-square {w['statistic']:.0f} on {w['dof']} dof, p = {w['p_value']:.1e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "change_of_variables.json").write_text(json.dumps({k: v for k, v in res.items() if not k.startswith("_")},
                                                            indent=1))
    plot(res, out / "change_of_variables.png")
    print(f"wrote {out / 'change_of_variables.json'} and {out / 'change_of_variables.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
