"""A small VAE on sklearn's 8x8 digits: the gradient estimators where they are used.

Five models share one architecture and one budget (steps, batch, optimiser, seed):
  gaussian-pathwise   Gaussian latents, gradient of the single-sample ELBO by reparameterization
  gaussian-score      the same model and objective, encoder gradient by the score function (REINFORCE
                      with a moving-average baseline); the decoder gradient is the same in both
  concrete            discrete latents (M categorical variables of C classes) trained through the
                      Gumbel-softmax relaxation (--straight-through: one-hot forward, relaxed backward)
  iwae                Gaussian latents, the IWAE-K bound (K = --iwae-k) trained with its own reparameterized
                      gradient (Burda et al. 2016)
  iwae-dreg           the same bound; the encoder's gradient doubly reparameterized (DReG, Tucker et al. 2018)
For each model: held-out ELBO, IWAE-K (K = 1, 5, 25, 100) and the rate E_x KL(q(z | x) || p(z)), the
information the latents carry (0: posterior collapse, and then IWAE-K = ELBO for every K). Then two studies
of the encoder's gradient:
  variance per estimator   R independent estimates on one training batch at the trained gaussian-pathwise model
                           (pathwise; score function without a baseline, with a batch baseline, with a per-digit
                           baseline) and at the trained concrete model (the same score-function variants, which
                           are unbiased there, and Gumbel-softmax / straight-through at two temperatures, with
                           their bias against the unbiased mean)
  SNR against K            signal-to-noise ratio of the IWAE-K encoder gradient for the IWAE and DReG estimators
                           at the trained iwae model, with fitted exponents (Rainforth et al. 2018: IWAE's decays
                           like K^-1/2; DReG's does not)

    .venv/bin/python examples/vae_digits.py              # about 2 minutes on 2 CPU cores
    .venv/bin/python examples/vae_digits.py --steps 300  # a quick look (the concrete model is still collapsed)

Writes --out/vae_digits.png (learning curves, IWAE-K against K, gradient variance per estimator, SNR against K)
next to vae_digits.json. Pixels are binarised (x > 8 of 16), so log p(x | z) is a proper Bernoulli likelihood
and the bounds are bounds on a real log-likelihood, in nats per digit.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sdekit.estimators import SCALES, elbo, gumbel_noise, gumbel_softmax, iwae_curve

KS = (1, 5, 25, 100)
KINDS = ("gaussian-pathwise", "gaussian-score", "concrete", "iwae", "iwae-dreg")
LOG_2PI = math.log(2 * math.pi)
COLLAPSE_RATE = 0.1     # nats per digit: below this the latents carry (almost) no information about x


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
    prior uniform; the decoder reads z flattened to M*C. The encoder's raw output raw = encoder(x): (..., B, E)
    is read by `gaussian` / `categorical`; the gradient studies differentiate with respect to it.
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

    def gaussian(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """mu, sigma: (..., B, L) from raw: (..., B, 2L)."""
        mu, r = raw.chunk(2, -1)
        return mu, self.scale(r)

    def categorical(self, raw: Tensor) -> Tensor:
        """log-probabilities: (..., B, M, C) from raw: (..., B, M*C)."""
        return torch.log_softmax(raw.view(*raw.shape[:-1], self.dim, self.categories), -1)

    def q_gaussian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """mu, sigma: (B, L)."""
        return self.gaussian(self.encoder(x))

    def q_logits(self, x: Tensor) -> Tensor:
        """log-probabilities: (B, M, C)."""
        return self.categorical(self.encoder(x))

    def log_px(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) for z: (..., B, L) or (..., B, M, C) -> (..., B)."""
        logits = self.decoder(z.flatten(-2) if self.latent == "categorical" else z)
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)

    def kl_categorical(self, logq: Tensor) -> Tensor:
        """KL(q || uniform) summed over the M variables: (..., B, M, C) -> (..., B)."""
        return (logq.exp() * (logq + math.log(self.categories))).sum((-1, -2))

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

    @torch.no_grad()
    def rate(self, x: Tensor) -> Tensor:
        """KL(q(z | x) || p(z)) per data point, in closed form: (B,)."""
        if self.latent == "gaussian":
            mu, sigma = self.q_gaussian(x)
            return 0.5 * (mu ** 2 + sigma ** 2 - 1 - 2 * torch.log(sigma)).sum(-1)
        return self.kl_categorical(self.q_logits(x))


# --- estimators ---------------------------------------------------------------------------------------------
# Each takes the encoder's raw output raw: (*R, B, E) (R: optional leading repeat axes) and returns a per-digit
# surrogate (*R, B) to maximise: its gradient, with respect to raw and to the decoder, is the estimate.

def _gaussian_log_w(model: VAE, x: Tensor, mu: Tensor, sigma: Tensor, z: Tensor, stop_q: bool = False) -> Tensor:
    """log p(x | z) + log p(z) - log q(z | x); stop_q: q's parameters detached inside log q (z keeps its path)."""
    q_mu, q_sigma = (mu.detach(), sigma.detach()) if stop_q else (mu, sigma)
    return model.log_px(x, z) + normal_log_prob(z) - normal_log_prob(z, q_mu, q_sigma)


def elbo_pathwise(model: VAE, x: Tensor, raw: Tensor, gen: torch.Generator) -> Tensor:
    """log w(z), z = mu + sigma * eps: the gradient flows through the sample (Kingma & Welling 2014)."""
    mu, sigma = model.gaussian(raw)
    z = mu + sigma * torch.randn(mu.shape, generator=gen)
    return _gaussian_log_w(model, x, mu, sigma, z)


def _score_parts(model: VAE, x: Tensor, raw: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(log q(z), log w(z)) for z ~ q drawn without a gradient path: two (*R, B)."""
    mu, sigma = model.gaussian(raw)
    z = (mu + sigma * torch.randn(mu.shape, generator=gen)).detach()
    log_q = normal_log_prob(z, mu, sigma)
    return log_q, model.log_px(x, z) + normal_log_prob(z) - log_q


def elbo_score(model: VAE, x: Tensor, raw: Tensor, gen: torch.Generator, baseline: Tensor | float = 0.0) -> Tensor:
    """(log w - b) log q(z) + log w with z drawn without a gradient path: grad E_q[log w] =
    E[(log w - b) grad log q(z)] + E[grad log w]. The second term carries the decoder's gradient (and the zero-mean
    -grad log q for the encoder). b must not depend on this z (a constant, or from other draws) to stay unbiased."""
    log_q, log_w = _score_parts(model, x, raw, gen)
    return (log_w.detach() - baseline) * log_q + log_w


def categorical_score(model: VAE, x: Tensor, raw: Tensor, gen: torch.Generator,
                      baseline: Tensor | float = 0.0) -> Tensor:
    """Score-function surrogate of E_q[log p(x | z)] - KL(q || uniform) for exact categorical draws (Gumbel-max):
    (log p(x | z) - b) log q(z) + log p(x | z) - KL, the KL in closed form. Unbiased."""
    logq = model.categorical(raw)
    k = (logq.detach() + gumbel_noise(logq.shape, generator=gen)).argmax(-1)
    z = F.one_hot(k, model.categories).to(logq.dtype)
    rec = model.log_px(x, z)
    return (rec.detach() - baseline) * (z * logq).sum((-1, -2)) + rec - model.kl_categorical(logq)


def categorical_relaxed(model: VAE, x: Tensor, raw: Tensor, gen: torch.Generator, temperature: float = 0.5,
                        hard: bool = False) -> Tensor:
    """log p(x | z) - KL with z = gumbel_softmax(logits, temperature) (Jang et al. 2017; Maddison et al. 2017):
    a pathwise gradient of the relaxed objective, biased for the categorical one. hard: straight-through."""
    logq = model.categorical(raw)
    z = gumbel_softmax(logq, temperature, hard=hard, generator=gen)
    return model.log_px(x, z) - model.kl_categorical(logq)


def iwae_log_weights(model: VAE, x: Tensor, raw: Tensor, gen: torch.Generator, K: int,
                     stop_q: bool = False) -> Tensor:
    """log w_k for K reparameterized draws z_k = mu + sigma * eps_k: (K, *R, B)."""
    mu, sigma = model.gaussian(raw)
    z = mu + sigma * torch.randn((K, *mu.shape), generator=gen)
    return _gaussian_log_w(model, x, mu, sigma, z, stop_q=stop_q)


def iwae_bound(model: VAE, x: Tensor, raw: Tensor, gen: torch.Generator, K: int = 10) -> Tensor:
    """log (1/K) sum_k w_k with z_k = mu + sigma * eps_k; its gradient is IWAE's own estimator (Burda et al. 2016)."""
    return torch.logsumexp(iwae_log_weights(model, x, raw, gen, K), 0) - math.log(K)


def dreg_surrogates(log_w: Tensor) -> tuple[Tensor, Tensor]:
    """(encoder surrogate, decoder surrogate) of the doubly reparameterized IWAE-K gradient (Tucker et al. 2018,
    eq. 7), from log_w: (K, ...) computed with log q's parameters detached (`iwae_log_weights(stop_q=True)`).

    With normalised weights w~_k = w_k / sum_j w_j held constant: encoder sum_k w~_k^2 log w_k, whose gradient is
    sum_k w~_k^2 d log w_k / d z_k dz_k / dphi; decoder sum_k w~_k log w_k, IWAE's own decoder gradient. Both are
    unbiased for the IWAE-K gradient."""
    w = torch.softmax(log_w.detach(), 0)
    return (w ** 2 * log_w).sum(0), (w * log_w).sum(0)


def iwae_dreg(model: VAE, x: Tensor, raw: Tensor, gen: torch.Generator, K: int = 10) -> Tensor:
    """The encoder surrogate of `dreg_surrogates` (what the encoder-gradient studies differentiate)."""
    return dreg_surrogates(iwae_log_weights(model, x, raw, gen, K, stop_q=True))[0]


def iwae_stl(model: VAE, x: Tensor, raw: Tensor, gen: torch.Generator, K: int = 10) -> Tensor:
    """sum_k w~_k log w_k with log q's parameters detached ("sticking the landing" applied to IWAE): the estimator
    DReG corrects. It drops the score term without the reweighting and is biased for K > 1."""
    return dreg_surrogates(iwae_log_weights(model, x, raw, gen, K, stop_q=True))[1]


# --- training losses (x: (B, 64); scalar losses to minimise) ---------------------------------------------------

def loss_pathwise(model: VAE, x: Tensor, gen: torch.Generator) -> Tensor:
    """-ELBO with z = mu + sigma * eps: gradients flow through the sample."""
    return -elbo_pathwise(model, x, model.encoder(x), gen).mean()


class ScoreFunctionLoss:
    """Surrogate whose gradient is the score-function estimate of -grad ELBO (`elbo_score`), with b a moving
    average of the learning signal log w over earlier batches: a constant for this batch, so the estimator
    stays unbiased."""

    def __init__(self, momentum: float = 0.9):
        self.baseline, self.momentum = None, momentum

    def __call__(self, model: VAE, x: Tensor, gen: torch.Generator) -> Tensor:
        log_q, log_w = _score_parts(model, x, model.encoder(x), gen)
        signal = log_w.detach()
        b = 0.0 if self.baseline is None else self.baseline        # from earlier batches only (0 on the first)
        m = signal.mean()
        self.baseline = m if self.baseline is None else self.momentum * self.baseline + (1 - self.momentum) * m
        return -((signal - b) * log_q + log_w).mean()


def loss_concrete(model: VAE, x: Tensor, gen: torch.Generator, temperature: float, hard: bool) -> Tensor:
    """-(E_relaxed[log p(x | z)] - KL(q || uniform)), z = gumbel_softmax(logits, temperature)."""
    return -categorical_relaxed(model, x, model.encoder(x), gen, temperature, hard).mean()


def loss_iwae(model: VAE, x: Tensor, gen: torch.Generator, K: int) -> Tensor:
    """-IWAE-K, differentiated as it stands (the reparameterized IWAE gradient)."""
    return -iwae_bound(model, x, model.encoder(x), gen, K).mean()


def backward_dreg(model: VAE, x: Tensor, gen: torch.Generator, K: int) -> Tensor:
    """Sets .grad of the encoder to -DReG and of the decoder to -IWAE's decoder gradient; returns -IWAE-K (detached)."""
    log_w = iwae_log_weights(model, x, model.encoder(x), gen, K, stop_q=True)
    enc_obj, dec_obj = dreg_surrogates(log_w)
    enc, dec = list(model.encoder.parameters()), list(model.decoder.parameters())
    g_enc = torch.autograd.grad(-enc_obj.mean(), enc, retain_graph=True)
    g_dec = torch.autograd.grad(-dec_obj.mean(), dec)
    for p, g in zip(enc + dec, g_enc + g_dec):
        p.grad = g
    return -(torch.logsumexp(log_w.detach(), 0) - math.log(K)).mean()


@torch.no_grad()
def held_out_elbo(model: VAE, x: Tensor, K: int = 10, seed: int = 123) -> float:
    """ELBO on x averaged over K samples per point (a fixed generator, so curves are comparable)."""
    return elbo(model.log_weights(x, K, torch.Generator().manual_seed(seed))).mean().item()


def train(kind: str, x_train: Tensor, x_test: Tensor, *, steps: int = 3000, batch: int = 64, lr: float = 1e-3,
          seed: int = 0, eval_every: int = 100, straight_through: bool = False, scale: str = "softplus",
          K: int = 10, hidden: int = 128, dim: int = 8, progress: bool = True) -> tuple[VAE, dict]:
    """Train one model; kind in KINDS (K: samples of the IWAE bound). Returns the model and its learning curve
    {"step": [...], "train_loss": [...], "test_elbo": [...], "rate": [...]}; rate: held-out KL(q || p)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    torch.manual_seed(seed)                        # initial weights: identical for the Gaussian models
    model = VAE("categorical" if kind == "concrete" else "gaussian", scale=scale, hidden=hidden, dim=dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)  # minibatches and latent noise
    sf_loss = ScoreFunctionLoss()
    curve = {"step": [], "train_loss": [], "test_elbo": [], "rate": []}
    running = None
    for step in tqdm(range(1, steps + 1), desc=kind, disable=not progress, leave=False):
        x = x_train[torch.randint(len(x_train), (batch,), generator=gen)]
        opt.zero_grad()
        if kind == "iwae-dreg":
            loss = backward_dreg(model, x, gen, K)
        else:
            if kind == "gaussian-pathwise":
                loss = loss_pathwise(model, x, gen)
            elif kind == "gaussian-score":
                loss = sf_loss(model, x, gen)
            elif kind == "iwae":
                loss = loss_iwae(model, x, gen, K)
            else:
                tau = max(0.5, math.exp(-3e-4 * step))    # anneal the relaxation from 1 towards 0.5
                loss = loss_concrete(model, x, gen, tau, straight_through)
            loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % eval_every == 0 or step == steps:
            curve["step"].append(step)
            curve["train_loss"].append(running)
            curve["test_elbo"].append(held_out_elbo(model, x_test))
            curve["rate"].append(model.rate(x_test).mean().item())
    return model, curve


@torch.no_grad()
def evaluate(model: VAE, x_test: Tensor, ks=KS, pool: int = 200, seed: int = 7) -> dict:
    """Held-out ELBO and IWAE-K from one pool of `pool` log-weights per digit (nats per digit, with
    standard errors over digits; IWAE-K differences are paired over the same pool), and the rate
    E_x KL(q(z | x) || p(z)). collapsed: rate below COLLAPSE_RATE, where q(z | x) is (nearly) the prior for every
    x; a decoder that ignores z then makes every weight equal p(x), and IWAE-K = ELBO for every K."""
    log_w = model.log_weights(x_test, pool, torch.Generator().manual_seed(seed))     # (pool, B)
    per_point = iwae_curve(log_w, list(ks))
    n = x_test.shape[0]
    rate = model.rate(x_test)
    out = {"elbo": elbo(log_w).mean().item(), "elbo_se": (elbo(log_w).std() / math.sqrt(n)).item(), "iwae": {},
           "rate": rate.mean().item(), "rate_se": (rate.std() / math.sqrt(n)).item()}
    out["collapsed"] = out["rate"] < COLLAPSE_RATE
    for k, v in per_point.items():
        out["iwae"][k] = {"mean": v.mean().item(), "se": (v.std() / math.sqrt(n)).item()}
    return out


# --- encoder-gradient studies ---------------------------------------------------------------------------------

def encoder_gradients(model: VAE, x: Tensor, estimator, repeats: int, *, generator: torch.Generator,
                      wrt: str = "params", chunk: int | None = None, **options) -> Tensor:
    """`repeats` independent estimates of the encoder's gradient of the batch-mean objective: (repeats, P).

    The encoder runs once; its output is replicated `repeats` times as a leaf raw: (R, B, E), the estimator draws
    its own noise for each copy, and one backward pass gives every copy's d/d raw. wrt="outputs" returns those
    flattened (P = B * E); wrt="params" maps them to the encoder's parameters by a batched vector-Jacobian
    product (P = number of encoder parameters). chunk: copies per pass (default: about 2e5 decoder rows)."""
    if wrt not in ("params", "outputs"):
        raise ValueError(f"wrt must be 'params' or 'outputs', got {wrt!r}")
    params = list(model.encoder.parameters())
    raw = model.encoder(x)
    rows = x.shape[0] * options.get("K", 1)
    chunk = chunk or max(1, min(repeats, 200_000 // rows))
    out = []
    for start in range(0, repeats, chunk):
        m = min(chunk, repeats - start)
        leaf = raw.detach().expand(m, *raw.shape).clone().requires_grad_(True)
        obj = estimator(model, x, leaf, generator, **options).mean(-1)         # (m,)
        (g_raw,) = torch.autograd.grad(obj.sum(), leaf)                         # (m, B, E)
        if wrt == "outputs":
            out.append(g_raw.flatten(1))
            continue
        g = torch.autograd.grad(raw, params, grad_outputs=g_raw, is_grads_batched=True, retain_graph=True)
        out.append(torch.cat([t.flatten(1) for t in g], 1))
    return torch.cat(out).detach()


def gradient_stats(G: Tensor) -> dict:
    """Summary of R estimates G: (R, P): total variance (trace of the covariance of one estimate), the norm of the
    mean, and snr = ||E g|| / sqrt(trace Cov), with ||E g||^2 estimated without bias as ||mean||^2 - trace / R."""
    R = G.shape[0]
    mean, var = G.mean(0), G.var(0)
    signal2 = (mean.pow(2).sum() - var.sum() / R).clamp_min(0)
    return {"repeats": R, "variance": var.sum().item(), "mean_norm": mean.norm().item(),
            "snr": (signal2.sqrt() / var.sum().sqrt()).item()}


def _pilot_baselines(model: VAE, x: Tensor, gen: torch.Generator, draws: int = 16) -> tuple[float, Tensor]:
    """(batch mean, per-digit mean) of the score function's learning signal over `draws` independent draws:
    log w for Gaussian latents, log p(x | z) for categorical ones. Independent of the estimate's own draws."""
    with torch.no_grad():
        raw = model.encoder(x).expand(draws, *model.encoder(x).shape)
        if model.latent == "gaussian":
            signal = _score_parts(model, x, raw, gen)[1]
        else:
            logq = model.categorical(raw)
            k = (logq + gumbel_noise(logq.shape, generator=gen)).argmax(-1)
            signal = model.log_px(x, F.one_hot(k, model.categories).to(logq.dtype))
    per_digit = signal.mean(0)
    return per_digit.mean().item(), per_digit


def variance_study(model: VAE, x: Tensor, repeats: int = 256, *, temperatures=(1.0, 0.5),
                   generator: torch.Generator) -> list[dict]:
    """Encoder-gradient variance per estimator at `model` on the batch x (repeats estimates each).

    Gaussian latents: pathwise, score (no baseline), score + baseline (a batch mean of log w from pilot draws),
    score + baseline(x) (a per-digit mean); reference: pathwise. Categorical latents: the same score-function
    variants (unbiased) and Gumbel-softmax / straight-through at each temperature; reference: score + baseline(x).
    Row fields: variance (trace), variance relative to the reference, mean_norm, snr, and the mean's distance to
    the reference's mean: mean_z2 = the average over coordinates of (m - m_ref)^2 / (se^2 + se_ref^2), about 1
    when the two means agree (each term has expectation 1 then; heavy-tailed estimates pull it below 1), and
    rel_bias = sqrt(max(||m - m_ref||^2 - the sum of se^2 + se_ref^2, 0)) / ||m_ref||, the bias as a fraction of
    the gradient's norm, next to rel_bias_noise = (2 sum (se^2 + se_ref^2)^2)^(1/4) / ||m_ref||, the value noise
    alone reaches at one standard deviation if the coordinates were independent."""
    b_batch, b_digit = _pilot_baselines(model, x, generator)
    if model.latent == "gaussian":
        ests = {"pathwise": (elbo_pathwise, {}), "score": (elbo_score, {}),
                "score + baseline": (elbo_score, {"baseline": b_batch}),
                "score + baseline(x)": (elbo_score, {"baseline": b_digit})}
        ref = "pathwise"
    else:
        ests = {"score": (categorical_score, {}), "score + baseline": (categorical_score, {"baseline": b_batch}),
                "score + baseline(x)": (categorical_score, {"baseline": b_digit})}
        for tau in temperatures:
            ests[f"gumbel-softmax tau={tau}"] = (categorical_relaxed, {"temperature": tau})
            ests[f"straight-through tau={tau}"] = (categorical_relaxed, {"temperature": tau, "hard": True})
        ref = "score + baseline(x)"
    grads = {name: encoder_gradients(model, x, fn, repeats, generator=generator, **opts)
             for name, (fn, opts) in ests.items()}
    m_ref, se2_ref = grads[ref].mean(0), grads[ref].var(0) / repeats
    v_ref = grads[ref].var(0).sum().item()
    rows = []
    for name, G in grads.items():
        st = gradient_stats(G)
        d2 = (G.mean(0) - m_ref).pow(2)
        s2 = G.var(0) / repeats + se2_ref
        rows.append({"latent": model.latent, "estimator": name, **st, "variance_over_reference": st["variance"] / v_ref,
                     "reference": ref, "mean_z2": _mean_z2(d2, s2) if name != ref else float("nan"),
                     "rel_bias": ((d2.sum() - s2.sum()).clamp_min(0).sqrt() / m_ref.norm()).item() if name != ref else 0.0,
                     "rel_bias_noise": ((2 * s2.pow(2).sum()) ** 0.25 / m_ref.norm()).item() if name != ref else 0.0})
    return rows


def _mean_z2(d2: Tensor, s2: Tensor) -> float:
    """Average of d2 / s2 over the coordinates with s2 > 0."""
    keep = s2 > 1e-30
    return (d2[keep] / s2[keep]).mean().item()


def fit_exponent(ks, values) -> tuple[float, float]:
    """Least-squares slope of log(value) against log(K) and its standard error (from the residuals)."""
    x = torch.tensor([math.log(k) for k in ks], dtype=torch.float64)
    y = torch.tensor([math.log(max(v, 1e-300)) for v in values], dtype=torch.float64)
    xc = x - x.mean()
    slope = (xc * (y - y.mean())).sum() / (xc ** 2).sum()
    resid = y - y.mean() - slope * xc
    se = math.sqrt((resid ** 2).sum().item() / max(len(ks) - 2, 1) / (xc ** 2).sum().item()) if len(ks) > 2 else math.nan
    return slope.item(), se


def snr_study(model: VAE, x: Tensor, ks=(1, 2, 4, 8, 16, 32, 64, 128), repeats: int = 500, *,
              generator: torch.Generator, wrt: str = "params") -> dict:
    """SNR of the IWAE-K encoder gradient against K for IWAE's own estimator and DReG, at `model` on the batch x.

    Both estimators are unbiased for the same gradient, d/dphi IWAE-K, so its norm is estimated once from both
    (per coordinate, the inverse-variance weighted mean of the two means; its squared norm less the sum of its
    variances): the numerator is then as precise as DReG's low variance allows even where IWAE's own mean is
    buried in noise. snr = that norm / sqrt(trace Cov) of each estimator; snr_own uses the estimator's own mean
    (`gradient_stats`). mean_z2 checks the shared-mean premise: the average over coordinates of
    (m_iwae - m_dreg)^2 / (se_iwae^2 + se_dreg^2), about 1 when the means agree. Exponents: least-squares slopes
    of log snr against log K. ess_fraction: the effective sample size (sum w)^2 / sum w^2 of K weights over K,
    averaged over digits. The laws (IWAE K^-1/2, DReG K^+1/2) are asymptotic, for K large against
    Var(w) / E[w]^2, i.e. where ess_fraction has levelled off at 1 / (1 + Var(w) / E[w]^2); while it is still
    falling, the measured exponents need not be near them."""
    rows = []
    for K in ks:
        G = {"iwae": encoder_gradients(model, x, iwae_bound, repeats, generator=generator, wrt=wrt, K=K),
             "dreg": encoder_gradients(model, x, iwae_dreg, repeats, generator=generator, wrt=wrt, K=K)}
        m = {k: g.mean(0) for k, g in G.items()}
        se2 = {k: (g.var(0) / repeats).clamp_min(1e-30) for k, g in G.items()}
        w_i, w_d = 1 / se2["iwae"], 1 / se2["dreg"]
        pooled = (m["iwae"] * w_i + m["dreg"] * w_d) / (w_i + w_d)
        signal = ((pooled.pow(2) - 1 / (w_i + w_d)).sum()).clamp_min(0).sqrt()
        with torch.no_grad():     # effective sample size of the normalised weights, over 20 draws of K per digit
            lw = torch.cat([model.log_weights(x, K, generator) for _ in range(20)], 1)       # (K, 20 B)
            ess = torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0))
        row = {"K": K, "signal_norm": signal.item(), "ess_fraction": (ess / K).mean().item(),
               "mean_z2": _mean_z2((m["iwae"] - m["dreg"]).pow(2), se2["iwae"] + se2["dreg"])}
        for k, g in G.items():
            st = gradient_stats(g)
            row[k] = {"variance": st["variance"], "snr": (signal / math.sqrt(st["variance"])).item(),
                      "snr_own": st["snr"]}
        rows.append(row)
    out = {"ks": list(ks), "repeats": repeats, "digits": x.shape[0], "wrt": wrt, "rows": rows}
    for k in ("iwae", "dreg"):
        slope, se = fit_exponent(ks, [r[k]["snr"] for r in rows])
        out[f"{k}_exponent"], out[f"{k}_exponent_se"] = slope, se
    return out


# --- the report ---------------------------------------------------------------------------------------------------

def plot(curves: dict, results: dict, variance_rows: list[dict], snr: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    a = ax[0][0]
    for name, c in curves.items():
        a.plot(c["step"], c["test_elbo"], label=name)
    a.set(title="held-out ELBO (nats per digit)", xlabel="step")
    a.legend(fontsize=8)
    a = ax[0][1]
    for name, r in results.items():
        ks = sorted(r["iwae"])
        line, = a.semilogx(ks, [r["iwae"][k]["mean"] for k in ks], "o-", label=f"{name}: IWAE-K")
        a.axhline(r["elbo"], color=line.get_color(), ls=":", lw=1)
    a.set(title="held-out IWAE-K (dotted: ELBO)", xlabel="K")
    a.legend(fontsize=8)
    a = ax[1][0]
    if variance_rows:
        labels = [f"{r['latent'][:4]}: {r['estimator']}" for r in variance_rows]
        a.barh(range(len(labels)), [r["variance"] for r in variance_rows],
               color=["C0" if r["latent"] == "gaussian" else "C1" for r in variance_rows])
        a.set_yticks(range(len(labels)), labels, fontsize=7)
        a.set_xscale("log")
        a.invert_yaxis()
        a.set(title="encoder-gradient variance per estimator (trace of the covariance)", xlabel="variance")
    a = ax[1][1]
    if snr:
        ks = snr["ks"]
        for k, c in (("iwae", "C3"), ("dreg", "C2")):
            a.loglog(ks, [r[k]["snr"] for r in snr["rows"]], "o-", color=c,
                     label=f"{k.upper()}: slope {snr[f'{k}_exponent']:+.2f}")
        ref = snr["rows"][0]["iwae"]["snr"]
        a.loglog(ks, [ref * k ** -0.5 for k in ks], ":", color="C3", lw=1, label="K^-1/2")
        a.set(title=f"SNR of the encoder gradient of IWAE-K ({snr.get('model', '')} model)", xlabel="K",
              ylabel="||E g|| / sqrt(tr Cov g)")
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
    p.add_argument("--iwae-k", type=int, default=10, help="samples of the bound the iwae models are trained on")
    p.add_argument("--hidden", type=int, default=128, help="hidden width of encoder and decoder")
    p.add_argument("--latent-dim", type=int, default=8, help="Gaussian latents L (categorical: L variables)")
    p.add_argument("--models", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--grad-repeats", type=int, default=256, help="estimates per estimator in the variance study (0: skip)")
    p.add_argument("--snr-ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--snr-repeats", type=int, default=500, help="estimates per (estimator, K) in the SNR study (0: skip)")
    p.add_argument("--snr-digits", type=int, default=16, help="held-out digits in the SNR study's batch")
    p.add_argument("--snr-model", default="iwae", choices=[k for k in KINDS if k != "concrete"],
                   help="the trained model the SNR study runs at")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is fastest for a model this small)")
    p.add_argument("--out", default="runs/vae_digits")
    args = p.parse_args(argv)
    if args.steps < 1 or args.iwae_k < 1 or min(args.snr_ks) < 1 or args.grad_repeats == 1 or args.snr_repeats == 1:
        p.error("--steps, --iwae-k and --snr-ks must be >= 1; --grad-repeats and --snr-repeats 0 or >= 2")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    x_train, x_test = load_digits_binary(args.seed)
    curves, results, models, timing = {}, {}, {}, {}
    for kind in args.models:
        t = time.time()
        name = kind + ("-st" if kind == "concrete" and args.straight_through else "")
        models[kind], curves[name] = train(kind, x_train, x_test, steps=args.steps, batch=args.batch, lr=args.lr,
                                           seed=args.seed, straight_through=args.straight_through, scale=args.scale,
                                           K=args.iwae_k, hidden=args.hidden, dim=args.latent_dim)
        results[name] = evaluate(models[kind], x_test)
        timing[name] = time.time() - t
    print(f"held-out digits: {len(x_test)}, nats per digit (higher is better); iwae models trained on K = {args.iwae_k};"
          f" rate: E_x KL(q(z|x) || p(z)), below {COLLAPSE_RATE} collapsed")
    print(f"{'model':<20} {'ELBO':>16} " + " ".join(f"{'IWAE-' + str(k):>16}" for k in KS) + f" {'rate KL(q||p)':>14}  train s")
    for name, r in results.items():
        cells = " ".join(f"{r['iwae'][k]['mean']:>9.2f} ± {r['iwae'][k]['se']:<4.2f}" for k in KS)
        flag = "  collapsed: q(z|x) = p(z)" if r["collapsed"] else ""
        print(f"{name:<20} {r['elbo']:>9.2f} ± {r['elbo_se']:<4.2f} {cells} {r['rate']:>14.3f} {timing[name]:>8.0f}{flag}")

    gen = torch.Generator().manual_seed(args.seed + 2)
    variance_rows = []
    if args.grad_repeats:
        x_batch = x_train[:args.batch]
        for kind in ("gaussian-pathwise", "concrete"):
            if kind in models:
                variance_rows += variance_study(models[kind], x_batch, args.grad_repeats, generator=gen)
        print(f"\nencoder-gradient variance on one training batch of {args.batch} digits, {args.grad_repeats} estimates each"
              " (variance: trace of the covariance of one estimate; rel. bias: ||mean - reference mean|| / ||reference"
              " mean||, next to the level noise alone reaches; mean z^2 about 1 when the means agree)")
        print(f"{'model':<12} {'estimator':<26} {'variance':>11} {'/ reference':>12} {'||mean||':>10} {'SNR':>7}"
              f" {'mean z^2':>8} {'rel. bias':>9} {'(noise)':>8}")
        for r in variance_rows:
            print(f"{r['latent']:<12} {r['estimator']:<26} {r['variance']:>11.4g} {r['variance_over_reference']:>12.3g}"
                  f" {r['mean_norm']:>10.4g} {r['snr']:>7.3f} {r['mean_z2']:>8.2f} {r['rel_bias']:>9.3f} {r['rel_bias_noise']:>8.3f}"
                  + ("   (reference)" if r["estimator"] == r["reference"] else ""))
    snr = None
    if args.snr_repeats and args.snr_model in models:
        snr = snr_study(models[args.snr_model], x_test[:args.snr_digits], args.snr_ks, args.snr_repeats, generator=gen)
        snr["model"] = args.snr_model
        print(f"\nSNR of the encoder gradient of IWAE-K at the trained {args.snr_model} model ({args.snr_digits} held-out digits,"
              f" {args.snr_repeats} estimates per estimator and K; SNR = ||E g|| / sqrt(trace Cov g))")
        print(f"{'K':>5} {'IWAE SNR':>10} {'DReG SNR':>10} {'IWAE var':>11} {'DReG var':>11} {'||E g||':>10} {'mean z^2':>8}"
              f" {'ESS / K':>8}")
        for r in snr["rows"]:
            print(f"{r['K']:>5} {r['iwae']['snr']:>10.4f} {r['dreg']['snr']:>10.4f} {r['iwae']['variance']:>11.4g}"
                  f" {r['dreg']['variance']:>11.4g} {r['signal_norm']:>10.4g} {r['mean_z2']:>8.2f} {r['ess_fraction']:>8.3f}")
        print(f"fitted exponents (SNR ~ K^a): IWAE a = {snr['iwae_exponent']:+.3f} ± {snr['iwae_exponent_se']:.3f},"
              f" DReG a = {snr['dreg_exponent']:+.3f} ± {snr['dreg_exponent_se']:.3f}  (theory: -1/2 and +1/2 for large K)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_digits.json").write_text(json.dumps({"args": vars(args), "curves": curves, "results": results,
                                                     "train_seconds": timing, "encoder_gradient_variance": variance_rows,
                                                     "snr": snr, "seconds": time.time() - t0}, indent=1))
    plot(curves, results, variance_rows, snr, out / "vae_digits.png")
    print(f"wrote {out / 'vae_digits.json'} and {out / 'vae_digits.png'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
