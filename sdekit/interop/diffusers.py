"""diffusers models in sdekit: a UNet2DModel (or any eps / v / x0 model on a DDPMScheduler-style discrete schedule)
as a score function, with the SDE its schedule defines, so every sdekit sampler and `log_likelihood` runs on it.

The discrete schedule alphas_cumprod[k] (k = 0..T-1) becomes a continuous variance-preserving SDE on t in [1/T, 1]
with timestep k at t = (k + 1) / T: log alpha_t^2 is the piecewise-linear interpolation of 0 at t = 0 and
log alphas_cumprod[k] at t = (k + 1) / T, so alpha_t, sigma_t = sqrt(1 - alpha_t^2) and the log-SNR equal the
scheduler's at every timestep exactly; in between, f(t) = (d/dt log alpha_t^2) / 2 and g(t)^2 = -d/dt log alpha_t^2
(piecewise constant, the continuous-time beta). t = 0 has sigma = 0, where grids ending at sigma = 0 land
(`sample(..., to_zero=True)`, the end of diffusers' DDIM with set_alpha_to_one=True).

    from diffusers import DDPMScheduler, UNet2DModel
    from sdekit.interop.diffusers import from_diffusers
    unet = UNet2DModel.from_pretrained("google/ddpm-cifar10-32")
    score, sde = from_diffusers(unet, DDPMScheduler.from_pretrained("google/ddpm-cifar10-32"))
    x = sdekit.sample(score, sde, (16, 3, 32, 32), "unipc", steps=10, to_zero=True)

This is the only sdekit module that imports diffusers (only to accept its objects; a model that is a plain
callable `model(x, timesteps) -> tensor` and a (T,) alphas_cumprod work without it).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._imports import PEERS_HINT
from ..sde import SDE

__all__ = ["DiscreteVPSDE", "DiffusersScore", "from_diffusers", "vp_trained_betas", "run_scheduler"]

PREDICTIONS = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction",
               "sample": "sample", "x0": "sample"}


def _require_diffusers():
    try:
        import diffusers
    except ModuleNotFoundError as e:
        raise ImportError(f"sdekit.interop.diffusers needs diffusers: {PEERS_HINT}") from e
    return diffusers


class DiscreteVPSDE(SDE):
    """The VP SDE of a discrete schedule alphas_cumprod: (T,), timestep k at t = (k + 1) / T (see the module doc)."""

    name = "discrete_vp"

    def __init__(self, alphas_cumprod):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be a decreasing sequence of at least 2 values in (0, 1)")
        self.T = ac.numel()
        self.alphas_cumprod = ac
        self._knots = torch.arange(self.T + 1, dtype=torch.float64) / self.T                  # t = 0, 1/T, ..., 1
        self._log_a2 = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(ac)])         # log alpha^2 at knots
        self._slope = torch.diff(self._log_a2) * self.T                                        # d/dt log alpha^2
        self.t_min, self.t_max = 1.0 / self.T, 1.0

    # t <-> timestep
    def timestep(self, t: Tensor) -> Tensor:
        """The (continuous) diffusers timestep of t: t T - 1."""
        return t * self.T - 1

    def t_of_timestep(self, k) -> Tensor:
        return (torch.as_tensor(k, dtype=torch.float64) + 1) / self.T

    def _log_alpha2(self, t: Tensor) -> Tensor:
        tt = t.to(torch.float64).clamp(0.0, 1.0)
        i = torch.clamp(torch.floor(tt * self.T).long(), max=self.T - 1)
        out = self._log_a2[i] + self._slope[i] * (tt - self._knots[i])
        return out.to(t.dtype) if t.dtype != torch.float64 else out

    def marginal(self, t, xp=torch):
        la2 = self._log_alpha2(torch.as_tensor(t, dtype=torch.get_default_dtype()) if not isinstance(t, Tensor) else t)
        return torch.exp(0.5 * la2), torch.sqrt(-torch.expm1(la2))

    def log_snr(self, t, xp=torch):
        la2 = self._log_alpha2(torch.as_tensor(t, dtype=torch.get_default_dtype()) if not isinstance(t, Tensor) else t)
        return la2 - torch.log(-torch.expm1(la2))

    def drift_coef(self, t, xp=torch):
        t = torch.as_tensor(t, dtype=torch.get_default_dtype()) if not isinstance(t, Tensor) else t
        i = torch.clamp(torch.floor(t.to(torch.float64) * self.T).long(), 0, self.T - 1)
        return (0.5 * self._slope[i]).to(t.dtype)

    def diffusion(self, t, xp=torch):
        return torch.sqrt(-2.0 * self.drift_coef(t))

    def t_from_log_snr(self, lam, xp=torch):
        lam = torch.as_tensor(lam, dtype=torch.get_default_dtype()) if not isinstance(lam, Tensor) else lam
        la2 = -torch.nn.functional.softplus(-lam.to(torch.float64))                           # log sigmoid(lam)
        neg = -self._log_a2                                                                     # increasing in t
        i = torch.clamp(torch.searchsorted(neg, (-la2).contiguous(), right=True) - 1, 0, self.T - 1)
        t = self._knots[i] + (la2 - self._log_a2[i]) / self._slope[i]
        return t.clamp(0.0, 1.0).to(lam.dtype)

    def config(self):
        return dict(name=self.name, T=self.T, alphas_cumprod_sha=_digest(self.alphas_cumprod))


def _digest(x: Tensor) -> str:
    import hashlib
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]


class DiffusersScore:
    """score_fn(x: (B, *S), t: (B,)) -> (B, *S) from model(x, timesteps) predicting eps, v or x0 under sde."""

    def __init__(self, model: Callable, sde: DiscreteVPSDE, prediction_type: str = "epsilon", model_kwargs=None):
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {sorted(PREDICTIONS)}")
        self.model, self.sde, self.prediction_type = model, sde, PREDICTIONS[prediction_type]
        self.model_kwargs = dict(model_kwargs or {})

    def _call_model(self, x: Tensor, timesteps: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype if hasattr(self.model, "parameters") else x.dtype
        out = self.model(x.to(dtype), timesteps.to(dtype), **self.model_kwargs)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        return out.to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        alpha, sigma = self.sde.marginal(t)
        a = alpha.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        out = self._call_model(x, self.sde.timestep(t))
        if self.prediction_type == "epsilon":
            eps = out
        elif self.prediction_type == "v_prediction":
            eps = s * x + a * out                                       # v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1
        else:
            eps = (x - a * out) / s
        return -eps / s


def from_diffusers(model: Callable, scheduler=None, *, alphas_cumprod=None, prediction_type: str | None = None,
                   model_kwargs=None) -> tuple[DiffusersScore, DiscreteVPSDE]:
    """(score_fn, sde) for a diffusers model and scheduler (DDPMScheduler, DDIMScheduler, ...: anything with
    alphas_cumprod and config.prediction_type), or for a plain model(x, timesteps) with alphas_cumprod given."""
    if scheduler is not None:
        _require_diffusers()
        alphas_cumprod = scheduler.alphas_cumprod
        prediction_type = prediction_type or getattr(scheduler.config, "prediction_type", "epsilon")
    if alphas_cumprod is None:
        raise ValueError("from_diffusers needs a scheduler or alphas_cumprod")
    sde = DiscreteVPSDE(alphas_cumprod)
    return DiffusersScore(model, sde, prediction_type or "epsilon", model_kwargs), sde


# --- a diffusers scheduler driven by an sdekit score (the accuracy report's peer measurement) ----------------------
def check_variance_preserving(sde: SDE) -> None:
    """ValueError unless alpha_t^2 + sigma_t^2 = 1 on sde's interval: diffusers' discrete schedules (betas) can only
    express such an SDE, and wiring another (VE, EDM) to them would compare samplers on the wrong ODE."""
    t = torch.linspace(sde.t_min, sde.t_max, 17, dtype=torch.float64)
    alpha, sigma = sde.marginal(t)
    gap = float((alpha ** 2 + sigma ** 2 - 1).abs().max())
    if gap > 1e-6:
        raise ValueError(f"diffusers' schedulers need a variance-preserving SDE (alpha^2 + sigma^2 = 1); "
                         f"{type(sde).__name__} is off by {gap:.3g}")


def vp_trained_betas(sde: SDE, n: int = 1000) -> Tensor:
    """float64 betas (n,) whose alphas_cumprod[k] equal alpha(t_k)^2 of sde at t_k = t_min + k (t_max - t_min) / (n - 1),
    so timestep n - 1 is t_max and timestep 0 is t_min (a VP SDE: alpha^2 + sigma^2 = 1)."""
    t = torch.linspace(sde.t_min, sde.t_max, n, dtype=torch.float64)
    ac = sde.marginal(t)[0] ** 2
    return 1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])


@contextlib.contextmanager
def numpy2_array_warnings_muted():
    """Mutes the two DeprecationWarnings NumPy 2 raises when diffusers' schedulers pass torch tensors to np.array
    (torch's __array__ / __array_wrap__ predate NumPy 2's signatures): harmless, and not sdekit's to fix."""
    with warnings.catch_warnings():
        for message in (r"__array__ implementation doesn't accept a copy keyword", r"__array_wrap__ must accept context"):
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        yield


def run_scheduler(scheduler: str, config: dict, score_fn: Callable, sde: SDE, x_T: Tensor, steps: int,
                  n_train: int = 1000) -> tuple[Tensor, int]:
    """Sample with diffusers' `scheduler` (a class name: DPMSolverMultistepScheduler, UniPCMultistepScheduler,
    DEISMultistepScheduler, DDIMScheduler, ...) for sde's probability-flow ODE from x_T at t_max, `steps` steps.

    The scheduler gets trained_betas reproducing sde at its timesteps (`vp_trained_betas`) and, where it has one,
    final_sigmas_type="sigma_min", so it ends at t_min. Its model is eps = -sigma_t score_fn(x, t) evaluated at the
    noise level its update assumes (scheduler.sigmas[i] where it keeps sigmas, else the timestep's t), so rounding
    Karras or Lu timesteps to integers does not count against it. Returns (x at t_min, NFE). Its schedulers'
    NumPy 2 deprecation warnings about torch tensors are muted (numpy2_array_warnings_muted); any other warning shows.
    """
    import inspect

    check_variance_preserving(sde)
    diffusers = _require_diffusers()
    cls = getattr(diffusers, scheduler)
    betas = vp_trained_betas(sde, n_train).numpy()
    t_of = lambda k: sde.t_min + float(k) * (sde.t_max - sde.t_min) / (n_train - 1)
    with numpy2_array_warnings_muted():
        extra = {"final_sigmas_type": "sigma_min"} if "final_sigmas_type" in inspect.signature(cls.__init__).parameters else {}
        sched = cls(num_train_timesteps=n_train, trained_betas=betas, prediction_type="epsilon", **extra, **config)
        sched.set_timesteps(steps)
        x, nfe = x_T.clone(), 0
        for i, k in enumerate(sched.timesteps):
            if hasattr(sched, "sigmas"):
                t = float(sde.t_from_sigma_ratio(torch.tensor(float(sched.sigmas[i]), dtype=torch.float64)))
            else:
                t = t_of(int(k))
            tb = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            eps = -sde.marginal(tb[:1])[1] * score_fn(x, tb)
            nfe += 1
            x = sched.step(eps, k, x).prev_sample
    return x, nfe
