"""A small VAE on sklearn's 8x8 digits: the gradient estimators where they are used.

Three models share one architecture and one budget (steps, batch, optimiser, seed):
  gaussian-pathwise   Gaussian latents, gradient of the single-sample ELBO by reparameterization
  gaussian-score      the same model and objective, encoder gradient by the score function (REINFORCE
                      with a moving-average baseline); the decoder gradient is the same in both
  concrete            discrete latents (M categorical variables of C classes) trained through the
                      Gumbel-softmax relaxation (--straight-through: one-hot forward, relaxed backward)
Then ELBO and IWAE-K (K = 1, 5, 25, 100) on held-out digits for each model.

    .venv/bin/python examples/vae_digits.py              # ~1-2 minutes on 2 CPU cores
    .venv/bin/python examples/vae_digits.py --steps 300  # a quick look

Writes learning curves and IWAE-K against K to --out/vae_digits.png next to vae_digits.json.
Pixels are binarised (x > 8 of 16), so log p(x | z) is a proper Bernoulli likelihood and the bounds
are bounds on a real log-likelihood, in nats per digit.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sdekit.estimators import SCALES, elbo, gumbel_noise, gumbel_softmax, iwae_curve

KS = (1, 5, 25, 100)
LOG_2PI = math.log(2 * math.pi)


def normal_log_prob(z: Tensor, mu: Tensor | float = 0.0, sigma: Tensor | float = 1.0) -> Tensor:
    """sum over the last axis of log N(z; mu, sigma^2): (..., L) -> (...)."""
    sigma = torch.as_tensor(sigma)
    return (-0.5 * ((z - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * LOG_2PI).sum(-1)


def load_digits_binary(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Binarised digits split into (train (N, 64), test (M, 64)) with a fixed permutation."""
    from sklearn.datasets import load_digits
    x = torch.tensor(load_digits().data > 8, dtype=torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    return x[perm[n_test:]], x[perm[:n_test]]


def mlp(d_in: int, d_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


class VAE(nn.Module):
    """Encoder q(z | x) and Bernoulli decoder p(x | z) with prior p(z).

    latent="gaussian": z: (L,), q = N(mu, sigma^2), prior N(0, I), sigma from a safe scale (softplus or
    clamped log-variance). latent="categorical": z: (M, C) one-hot rows, q = Cat(softmax(logits)),
    prior uniform; the decoder reads z flattened to M*C.
    """

    def __init__(self, latent: str = "gaussian", dim: int = 8, categories: int = 8, hidden: int = 128,
                 scale: str = "softplus"):
        super().__init__()
        if latent not in ("gaussian", "categorical"):
            raise ValueError(f"latent must be 'gaussian' or 'categorical', got {latent!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
        self.latent, self.dim, self.categories, self.scale = latent, dim, categories, SCALES[scale]
        z_size = dim if latent == "gaussian" else dim * categories
        self.encoder = mlp(64, 2 * dim if latent == "gaussian" else z_size, hidden)
        self.decoder = mlp(z_size, 64, hidden)

    # --- Gaussian latents ---
    def q_gaussian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """mu, sigma: (B, L)."""
        mu, raw = self.encoder(x).chunk(2, -1)
        return mu, self.scale(raw)

    # --- categorical latents ---
    def q_logits(self, x: Tensor) -> Tensor:
        """log-probabilities: (B, M, C)."""
        return torch.log_softmax(self.encoder(x).view(-1, self.dim, self.categories), -1)

    def log_px(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) for z: (..., B, L) or (..., B, M, C) -> (..., B)."""
        logits = self.decoder(z.flatten(-2) if self.latent == "categorical" else z)
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)

    @torch.no_grad()
    def log_weights(self, x: Tensor, K: int, generator: torch.Generator | None = None) -> Tensor:
        """log w = log p(x, z) - log q(z | x) for K independent z ~ q per data point: (K, B)."""
        if self.latent == "gaussian":
            mu, sigma = self.q_gaussian(x)
            z = mu + sigma * torch.randn((K, *mu.shape), generator=generator)
            log_q, log_pz = normal_log_prob(z, mu, sigma), normal_log_prob(z)
        else:
            logq = self.q_logits(x)
            k = (logq + gumbel_noise((K, *logq.shape), generator=generator)).argmax(-1)   # exact categorical draws
            z = F.one_hot(k, self.categories).float()
            log_q = (z * logq).sum((-1, -2))
            log_pz = torch.full_like(log_q, -self.dim * math.log(self.categories))
        return self.log_px(x, z) + log_pz - log_q


def loss_pathwise(model: VAE, x: Tensor, gen: torch.Generator) -> Tensor:
    """-ELBO with z = mu + sigma * eps: gradients flow through the sample."""
    mu, sigma = model.q_gaussian(x)
    z = mu + sigma * torch.randn(mu.shape, generator=gen)
    log_w = model.log_px(x, z) + normal_log_prob(z) - normal_log_prob(z, mu, sigma)
    return -log_w.mean()


class ScoreFunctionLoss:
    """Surrogate whose gradient is the score-function estimate of -grad ELBO.

    With z drawn without a gradient path, grad E_q[log w] = E[(log w - b) grad log q(z)] + E[grad log w];
    the second term carries the decoder's gradient (and a zero-mean encoder term). b is a moving
    average of the learning signal log w: a constant baseline, so the estimator stays unbiased.
    """

    def __init__(self, momentum: float = 0.9):
        self.baseline, self.momentum = None, momentum

    def __call__(self, model: VAE, x: Tensor, gen: torch.Generator) -> Tensor:
        mu, sigma = model.q_gaussian(x)
        z = (mu + sigma * torch.randn(mu.shape, generator=gen)).detach()
        log_q = normal_log_prob(z, mu, sigma)
        log_w = model.log_px(x, z) + normal_log_prob(z) - log_q
        signal = log_w.detach()
        # b comes from earlier batches only (0 on the first), so it is independent of this z
        b = 0.0 if self.baseline is None else self.baseline
        m = signal.mean()
        self.baseline = m if self.baseline is None else self.momentum * self.baseline + (1 - self.momentum) * m
        return -((signal - b) * log_q + log_w).mean()


def loss_concrete(model: VAE, x: Tensor, gen: torch.Generator, temperature: float, hard: bool) -> Tensor:
    """-(E_relaxed[log p(x | z)] - KL(q || uniform)), z = gumbel_softmax(logits / temperature) (Jang et al. 2017)."""
    logq = model.q_logits(x)
    z = gumbel_softmax(logq, temperature, hard=hard, generator=gen)
    kl = (logq.exp() * (logq + math.log(model.categories))).sum((-1, -2))
    return -(model.log_px(x, z) - kl).mean()


@torch.no_grad()
def held_out_elbo(model: VAE, x: Tensor, K: int = 10, seed: int = 123) -> float:
    """ELBO on x averaged over K samples per point (a fixed generator, so curves are comparable)."""
    return elbo(model.log_weights(x, K, torch.Generator().manual_seed(seed))).mean().item()


def train(kind: str, x_train: Tensor, x_test: Tensor, *, steps: int = 3000, batch: int = 64, lr: float = 1e-3,
          seed: int = 0, eval_every: int = 100, straight_through: bool = False, scale: str = "softplus",
          progress: bool = True) -> tuple[VAE, dict]:
    """Train one model; kind in {"gaussian-pathwise", "gaussian-score", "concrete"}. Returns the model and
    its learning curve {"step": [...], "train_loss": [...], "test_elbo": [...]}."""
    if kind not in ("gaussian-pathwise", "gaussian-score", "concrete"):
        raise ValueError(f"unknown model kind {kind!r}")
    torch.manual_seed(seed)                        # initial weights: identical for the two Gaussian models
    model = VAE("categorical" if kind == "concrete" else "gaussian", scale=scale)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)  # minibatches and latent noise
    sf_loss = ScoreFunctionLoss()
    curve = {"step": [], "train_loss": [], "test_elbo": []}
    running = None
    for step in tqdm(range(1, steps + 1), desc=kind, disable=not progress, leave=False):
        x = x_train[torch.randint(len(x_train), (batch,), generator=gen)]
        if kind == "gaussian-pathwise":
            loss = loss_pathwise(model, x, gen)
        elif kind == "gaussian-score":
            loss = sf_loss(model, x, gen)
        else:
            tau = max(0.5, math.exp(-3e-4 * step))    # anneal the relaxation from 1 towards 0.5
            loss = loss_concrete(model, x, gen, tau, straight_through)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % eval_every == 0 or step == steps:
            curve["step"].append(step)
            curve["train_loss"].append(running)
            curve["test_elbo"].append(held_out_elbo(model, x_test))
    return model, curve


@torch.no_grad()
def evaluate(model: VAE, x_test: Tensor, ks=KS, pool: int = 200, seed: int = 7) -> dict:
    """Held-out ELBO and IWAE-K from one pool of `pool` log-weights per digit (nats per digit, with
    standard errors over digits). IWAE-K differences are paired over the same pool."""
    log_w = model.log_weights(x_test, pool, torch.Generator().manual_seed(seed))     # (pool, B)
    per_point = iwae_curve(log_w, list(ks))
    n = x_test.shape[0]
    out = {"elbo": elbo(log_w).mean().item(), "elbo_se": (elbo(log_w).std() / math.sqrt(n)).item(), "iwae": {}}
    for k, v in per_point.items():
        out["iwae"][k] = {"mean": v.mean().item(), "se": (v.std() / math.sqrt(n)).item()}
    return out


def plot(curves: dict, results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, c in curves.items():
        ax[0].plot(c["step"], c["test_elbo"], label=name)
        ax[1].plot(c["step"], [-v for v in c["train_loss"]], label=name)
    ax[0].set(title="held-out ELBO (nats per digit)", xlabel="step")
    ax[1].set(title="training objective (smoothed)", xlabel="step")
    for name, r in results.items():
        ks = sorted(r["iwae"])
        line, = ax[2].semilogx(ks, [r["iwae"][k]["mean"] for k in ks], "o-", label=f"{name}: IWAE-K")
        ax[2].axhline(r["elbo"], color=line.get_color(), ls=":", lw=1)
    ax[2].set(title="held-out IWAE-K (dotted: ELBO)", xlabel="K")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", default="softplus", choices=sorted(SCALES))
    p.add_argument("--straight-through", action="store_true", help="one-hot forward pass for the Concrete model")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest for a model this small)")
    p.add_argument("--out", default="runs/vae_digits")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x_train, x_test = load_digits_binary(args.seed)
    curves, results = {}, {}
    for kind in ("gaussian-pathwise", "gaussian-score", "concrete"):
        name = kind + ("-st" if kind == "concrete" and args.straight_through else "")
        model, curves[name] = train(kind, x_train, x_test, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                    straight_through=args.straight_through, scale=args.scale)
        results[name] = evaluate(model, x_test)
    print(f"held-out digits: {len(x_test)}, nats per digit (higher is better)")
    print(f"{'model':<20} {'ELBO':>16} " + " ".join(f"{'IWAE-' + str(k):>16}" for k in KS))
    for name, r in results.items():
        cells = " ".join(f"{r['iwae'][k]['mean']:>9.2f} ± {r['iwae'][k]['se']:<4.2f}" for k in KS)
        print(f"{name:<20} {r['elbo']:>9.2f} ± {r['elbo_se']:<4.2f} {cells}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_digits.json").write_text(json.dumps({"args": vars(args), "curves": curves, "results": results}, indent=1))
    plot(curves, results, out / "vae_digits.png")
    print(f"wrote {out / 'vae_digits.json'} and {out / 'vae_digits.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
