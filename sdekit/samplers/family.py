"""The low-NFE frontier over a family of random exact targets that no one tuned on.

One mixture says little about a sampler: a setting tuned on it can lead there and trail elsewhere. The family is
drawn from a seed that is not chosen per run (`fresh_family_seed`: from os.urandom, printed and saved, so any run
can be reproduced with its seed), `size` Gaussian mixtures (`family_mixture`):
- dimension 2..8 and 3..10 components, uniformly;
- means ~ N(0, 1.5^2 I);
- each covariance R diag(s^2) R^T with a random rotation R and per-axis standard deviations s log-uniform over
  [0.08, 0.8] (a 10x range of scales, anisotropic within a component and across components);
- unequal weights (Dirichlet(1), floored at 0.02 and normalised).
Each target is sampled under VP (linear beta), VE and EDM from the same `batch` draws of x_T and scored, like
`sdekit.samplers.frontier`, by the median distance to a float64 rk45 solution (rtol = atol = 1e-10) from the same
x_T. Per (target, SDE, budget) the ratio of sdekit's best to the best of diffusers and k-diffusion (all run here,
in this process; diffusers only under VP, whose schedules it can express); per budget the median and the worst
ratio over the family. Two sdekit rows: "best" (its best sampler and grid for the target, chosen as the peers'
best is, with hindsight) and "recommended" (the one setting per budget in RECOMMENDED, fixed in advance).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..data import GaussianMixture
from ..sde import EDM, SDE, VESDE, VPSDE
from . import sample
from .frontier import BUDGETS, SDEKIT_CANDIDATES, SDEKIT_GRIDS, compare_samplers, median_distance
from .optimize import calibration_seed

__all__ = ["MixtureScore", "family_mixture", "draw_family", "fresh_family_seed", "family_sdes", "run_family",
           "family_markdown",
           "RECOMMENDED", "TUNING_FAMILY_SEED"]

# The family the defaults (RECOMMENDED, deis' basis, ...) were chosen on; reports use another, fresh seed.
TUNING_FAMILY_SEED = 20261204

# sdekit's one recommended setting per NFE budget (label of SDEKIT_CANDIDATES, grid), chosen on the family of
# TUNING_FAMILY_SEED (10 targets x VP, VE, EDM, 128 x_T) by the median ratio to the best peer, ties by the worst:
# there 0.58x (worst 1.02x), 0.32x (0.45x), 0.40x (1.04x), 0.43x (0.84x) at 5, 10, 15, 20 NFE.
RECOMMENDED: dict[int, tuple[str, str]] = {5: ("deis", "log_snr"), 10: ("deis o4", "log_snr"),
                                           15: ("deis", "edm"), 20: ("deis o4", "log_snr")}


# sdekit's candidates on the family: the multistep samplers (the first-order and Runge-Kutta ones never lead at
# 5-20 NFE on the single-target frontier, and the family is run on a few loaded cores)
FAMILY_CANDIDATES = [c for c in SDEKIT_CANDIDATES if c[1] in ("dpmpp_2m", "dpmpp_3m", "unipc", "deis")]


def fresh_family_seed() -> int:
    """A seed nobody chose: 62 bits from os.urandom."""
    return int.from_bytes(os.urandom(8), "little") >> 2


def family_mixture(generator: torch.Generator) -> GaussianMixture:
    """One random target of the family (module docstring), float64, drawn from generator."""
    g = generator
    dim = int(torch.randint(2, 9, (), generator=g))
    k = int(torch.randint(3, 11, (), generator=g))
    means = 1.5 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64))
    rot = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]          # Haar-distributed rotations
    stds = 0.08 * 10 ** torch.rand(k, dim, generator=g, dtype=torch.float64)       # log-uniform on [0.08, 0.8]
    covs = rot @ torch.diag_embed(stds**2) @ rot.transpose(1, 2)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    w = -torch.log(torch.rand(k, generator=g, dtype=torch.float64))               # Dirichlet(1)
    w = (w / w.sum()).clamp_min(0.02)
    return GaussianMixture(means, covs, w / w.sum())


def draw_family(seed: int, size: int) -> list[GaussianMixture]:
    """`size` targets drawn from `seed` (target i depends on seed and i only)."""
    if size < 1:
        raise ValueError(f"a family needs at least one target, got size={size}")
    gen = torch.Generator().manual_seed(seed % (2**63 - 1))
    return [family_mixture(gen) for _ in range(size)]


class MixtureScore:
    """The exact marginal score of a GaussianMixture under an SDE, as GaussianMixture.score computes it, but from
    one eigendecomposition per component, C_k = U diag(lam) U^T, made once: the diffused covariance
    alpha^2 C_k + sigma^2 I = U diag(alpha^2 lam + sigma^2) U^T needs no Cholesky factor per sample and time
    (10-20x faster at the family's sizes). score_fn(x: (B, d), t: (B,) or ()) -> (B, d)."""

    def __init__(self, gmm: GaussianMixture, sde: SDE):
        self.gmm, self.sde = gmm, sde
        self.lam, self.rot = torch.linalg.eigh(gmm.covs)                  # (K, d), (K, d, d)
        self.means, self.log_w = gmm.means, torch.log(gmm.weights)

    def __call__(self, x: Tensor, t) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        alpha, sigma = self.sde.marginal(t)
        alpha, sigma = alpha.to(x)[:, None, None], sigma.to(x)[:, None, None]
        lam, rot = self.lam.to(x), self.rot.to(x)
        var = alpha**2 * lam + sigma**2                                       # (B, K, d)
        z = ((x[:, None, :] - alpha * self.means.to(x)).unsqueeze(-2) @ rot).squeeze(-2)   # U^T (x - alpha m)
        zv = z / var
        log_comp = self.log_w.to(x) - 0.5 * (torch.log(var) + z * zv).sum(-1)
        r = torch.softmax(log_comp, dim=1)                                    # (B, K)
        return -((r[:, :, None] * zv).unsqueeze(-2) @ rot.transpose(1, 2)).squeeze(-2).sum(1)


def family_sdes() -> dict[str, SDE]:
    return {"vp": VPSDE(), "ve": VESDE(), "edm": EDM()}


def run_family(seed: int, size: int = 8, budgets=BUDGETS, batch: int = 128, sdes: tuple[str, ...] = ("vp", "ve", "edm"),
               peers: bool = True, candidates=None, grids=SDEKIT_GRIDS, optimize: bool = True,
               calibration_batch: int = 128, iterations: int = 25, progress: bool = True,
               on_cell: Callable[[dict], None] | None = None) -> dict:
    """The frontier on each target of draw_family(seed, size) under each SDE; returns the JSON-ready dict: 'cells'
    (one per target, SDE and budget: sdekit's best and recommended rows, the best peer's, the ratios), 'summary'
    (per budget: median and worst ratio over the cells, also per SDE), 'targets' and 'config'."""
    from tqdm.auto import tqdm

    all_sdes = family_sdes()
    unknown = sorted(set(sdes) - set(all_sdes))
    if unknown:
        raise ValueError(f"unknown SDE(s) {unknown}; the family runs under {sorted(all_sdes)}")
    targets = draw_family(seed, size)
    candidates = candidates or FAMILY_CANDIDATES
    cells, rows_all, skipped, measured = [], [], {}, set()
    start = time.perf_counter()
    jobs = [(i, name) for i in range(size) for name in sdes]
    bar = tqdm(jobs, desc="family frontier", disable=not progress)
    for i, name in bar:
        gmm, sde = targets[i], all_sdes[name]
        bar.set_postfix_str(f"target {i} (d={gmm.dim}, K={gmm.n_components}), {name}")
        score = MixtureScore(gmm, sde)
        gen = torch.Generator().manual_seed((seed + 7919 * (i + 1)) % (2**63 - 1))
        x_T = sde.prior_sample((batch, gmm.dim), generator=gen, dtype=torch.float64)
        ref = sample(score, sde, (batch, gmm.dim), "rk45", x_T=x_T, rtol=1e-10, atol=1e-10)
        res = compare_samplers(score, sde, x_T, lambda x, ref=ref: median_distance(x, ref), budgets, peers=peers,
                               candidates=candidates, grids=grids)
        if optimize:
            res["rows"] += _optimized_rows(score, sde, x_T, ref, budgets, calibration_batch, iterations,
                                           calibration_seed(seed + 7919 * (i + 1)), candidates)
        skipped.update({f"{lib} ({name})": why for lib, why in res["peers_skipped"].items()})
        measured.update(res["peers_measured"])
        for r in res["rows"]:
            rows_all.append(dict(target=i, sde=name,
                                 **{k: r[k] for k in ("library", "sampler", "grid", "budget", "error")}))
        for budget in budgets:
            cell = _cell(res["rows"], i, name, budget)
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
    summary = summarise(cells, budgets, sdes)
    return dict(config=dict(family_seed=seed, size=size, budgets=list(budgets), batch=batch,
                            sdes={n: all_sdes[n].config() for n in sdes},
                            calibration=dict(batch=calibration_batch, iterations=iterations) if optimize else None,
                            reference="rk45 float64 rtol=atol=1e-10 from the same x_T",
                            metric="median over x_T of the distance to the reference",
                            recommended={str(b): list(v) for b, v in RECOMMENDED.items()},
                            family=__doc__.split("\n\n")[1]),
                targets=[dict(dim=g.dim, components=g.n_components, weights=g.weights.tolist()) for g in targets],
                cells=cells, summary=summary, rows=rows_all, peers_measured=sorted(measured), peers_skipped=skipped,
                seconds=time.perf_counter() - start)


def _optimized_rows(score, sde: SDE, x_T: Tensor, ref: Tensor, budgets, calibration_batch: int, iterations: int,
                   seed: int, candidates) -> list[dict]:
    """The recommended sampler of each budget on a grid optimised for this target (optimize_grid: Adam through the
    sampler from the best fixed grid, on `calibration_batch` draws of x_T from the calibration stream `seed`, never
    the evaluation's x_T), scored on x_T against ref."""
    from .optimize import calibration_set_for, optimize_grid

    options = {label: (name, opts) for label, name, opts in candidates}
    calib = calibration_set_for(score, sde, (calibration_batch, x_T.shape[1]), 1e-9, x_T.dtype, x_T.device, seed)
    rows = []
    for budget in budgets:
        label, _ = RECOMMENDED[budget]
        name, opts = options[label]
        r = optimize_grid(score, sde, tuple(calib[0].shape), name, budget, options=opts, iterations=iterations,
                          dtype=x_T.dtype, calibration_set=calib)
        with torch.no_grad():
            x, info = sample(score, sde, tuple(x_T.shape), name, ts=r.grid(x_T.dtype), x_T=x_T, return_info=True,
                             **opts)
        rows.append(dict(library="sdekit", sampler=label, grid="optimized", budget=budget, steps=budget,
                         nfe=info["nfe"],
                         error=median_distance(x, ref) if bool(torch.isfinite(x).all()) else float("nan"),
                         init_grid=r.init_grid))
    return rows


def _cell(rows: list[dict], target: int, sde: str, budget: int) -> dict:
    def best(pred):
        cands = [r for r in rows
                 if pred(r) and r["budget"] == budget and r["nfe"] <= budget and np.isfinite(r["error"])]
        return min(cands, key=lambda r: r["error"]) if cands else None

    keep = lambda r: None if r is None else {k: r[k] for k in ("library", "sampler", "grid", "error", "nfe")}  # noqa: E731
    ours = best(lambda r: r["library"] == "sdekit")
    label, grid = RECOMMENDED.get(budget, (None, None))
    rec = best(lambda r: r["library"] == "sdekit" and r["sampler"] == label and r["grid"] == grid)
    opt = best(lambda r: r["library"] == "sdekit" and r["grid"] == "optimized")
    fixed = best(lambda r: r["library"] == "sdekit" and r["grid"] != "optimized")
    peer = best(lambda r: r["library"] != "sdekit")
    ratio = lambda r: None if r is None or peer is None else r["error"] / peer["error"]  # noqa: E731
    return dict(target=target, sde=sde, budget=budget, sdekit=keep(ours), recommended=keep(rec), optimized=keep(opt),
                fixed=keep(fixed), peer=keep(peer), ratio=ratio(ours), ratio_recommended=ratio(rec),
                ratio_optimized=ratio(opt), ratio_fixed=ratio(fixed))


def summarise(cells: list[dict], budgets, sdes) -> dict:
    """Per budget (and per budget and SDE): median and worst (largest) ratio over the cells, for 'best' and
    'recommended'."""
    def stats(sel):
        out = {}
        for key in ("ratio", "ratio_fixed", "ratio_recommended", "ratio_optimized"):
            v = [c[key] for c in sel if c[key] is not None and math.isfinite(c[key])]
            out[key] = dict(median=float(np.median(v)), worst=float(max(v)), n=len(v)) if v else None
        return out
    return {str(b): dict(all=stats([c for c in cells if c["budget"] == b]),
                         **{s: stats([c for c in cells if c["budget"] == b and c["sde"] == s]) for s in sdes})
            for b in budgets}


def family_markdown(result: dict) -> str:
    """The table: per budget, median / worst ratio to the best peer of sdekit's best (any sampler and grid, the
    optimised grid included), its best on fixed grids, the recommended setting on its fixed grid and on a grid
    optimised for the target; sdekit's best per SDE."""
    cfg = result["config"]
    sdes = list(cfg["sdes"])
    cols = [("ratio", "best"), ("ratio_fixed", "best fixed grid"), ("ratio_recommended", "recommended"),
            ("ratio_optimized", "recommended, optimised grid")]
    lines = [f"Family seed {cfg['family_seed']}: {cfg['size']} targets x {len(sdes)} SDEs ({', '.join(sdes)}), "
             f"{cfg['batch']} x_T each; peers: {', '.join(result['peers_measured']) or 'none'}. "
             "Each cell: median / worst over the family of sdekit's error over the best peer's.", "",
             "| NFE | " + " | ".join(c[1] for c in cols) + " | " + " | ".join(f"best, {s}" for s in sdes) + " |",
             "|---:|" + "---:|" * (len(cols) + len(sdes))]

    def cell(stats, key):
        v = (stats or {}).get(key)
        return "n/a" if not v else f"{v['median']:.2f} / {v['worst']:.2f}"
    for b in cfg["budgets"]:
        s = result["summary"][str(b)]
        lines.append(f"| {b} | " + " | ".join(cell(s["all"], k) for k, _ in cols) + " | "
                     + " | ".join(cell(s[n], "ratio") for n in sdes) + " |")
    return "\n".join(lines) + "\n"
