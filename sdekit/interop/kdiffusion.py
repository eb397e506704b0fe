"""k-diffusion's samplers driven by an sdekit score (the accuracy report's peer measurement); the only sdekit module
that imports k-diffusion.

k-diffusion works with y = x / alpha and sigma = sigma_t / alpha_t and a denoiser D(y; sigma); an sdekit score
under any SDE gives it as D = (x + sigma_t^2 score(x, t)) / alpha_t at x = alpha_t y, t = t(sigma).

k-diffusion's package __init__ imports torchvision, scikit-image, clean-fid and more, and its own dependencies
would replace this environment's numpy and torch builds; its `sampling` module needs only torch, scipy, torchsde,
torchdiffeq and `utils.append_dims`. So `load_sampling` imports k_diffusion.sampling normally and, when the package
import fails, loads sampling.py on its own with that one helper supplied (install it with
`pip install -c constraints.txt --no-deps k-diffusion` plus torchdiffeq).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable

import torch
from torch import Tensor

from .._imports import PEERS_HINT
from ..precond import data_prediction
from ..sde import SDE

__all__ = ["load_sampling", "denoiser", "sigmas", "run_sampler"]


def load_sampling() -> types.ModuleType:
    """k_diffusion.sampling; if the package import fails, its sampling.py alone (see the module doc)."""
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"sdekit.interop.kdiffusion needs k-diffusion: {PEERS_HINT}")
    name = "_sdekit_k_diffusion"
    if name + ".sampling" in sys.modules:
        return sys.modules[name + ".sampling"]
    package, utils = types.ModuleType(name), types.ModuleType(name + ".utils")
    package.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    path = list(spec.submodule_search_locations)[0] + "/sampling.py"
    sampling_spec = importlib.util.spec_from_file_location(name + ".sampling", path)
    module = importlib.util.module_from_spec(sampling_spec)
    sys.modules[name], sys.modules[name + ".utils"], sys.modules[name + ".sampling"] = package, utils, module
    try:
        sampling_spec.loader.exec_module(module)
    except ImportError as e:
        for key in (name, name + ".utils", name + ".sampling"):
            sys.modules.pop(key, None)
        raise ImportError(f"k-diffusion's sampling module could not be loaded ({e}); it needs torchsde and torchdiffeq") from e
    return module


def denoiser(score_fn: Callable, sde: SDE, counter: list | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """k-diffusion's model(y, sigma: (B,)) -> D from an sdekit score_fn(x, t) under sde; counts calls in counter[0]."""
    def model(y: Tensor, sigma: Tensor) -> Tensor:
        if counter is not None:
            counter[0] += 1
        t = sde.t_from_sigma_ratio(sigma.to(torch.float64)).to(y.dtype)
        alpha, sig = sde.marginal(t)
        x = alpha.reshape(-1, *([1] * (y.ndim - 1))) * y
        return data_prediction(score_fn(x, t), x, alpha, sig)
    return model


def sigmas(grid: str, sde: SDE, steps: int) -> Tensor:
    """float64 (steps + 1,) sigmas from sigma(t_max) to sigma(t_min) on k-diffusion's grid 'karras' (rho = 7),
    'exponential' or 'vp' (its continuous VP schedule, for a linear VPSDE on [t_min, 1])."""
    K = load_sampling()
    ends = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64)
    s_max, s_min = (float(v) for v in sde.sigma_ratio(ends))
    if grid == "karras":
        out = K.get_sigmas_karras(steps + 1, s_min, s_max, rho=7.0)
    elif grid == "exponential":
        out = K.get_sigmas_exponential(steps + 1, s_min, s_max)
    elif grid == "vp":
        out = K.get_sigmas_vp(steps + 1, beta_d=sde.beta_max - sde.beta_min, beta_min=sde.beta_min, eps_s=sde.t_min)
    else:
        raise ValueError(f"unknown k-diffusion grid {grid!r}; expected 'karras', 'exponential' or 'vp'")
    return out[:-1].to(torch.float64)                                    # the appended sigma = 0 dropped


def run_sampler(name: str, score_fn: Callable, sde: SDE, x_T: Tensor, sigma_grid: Tensor | None = None,
                steps: int | None = None, **options) -> tuple[Tensor, int]:
    """k-diffusion's sample_<name> from x_T at t_max to t_min: (x at t_min, NFE). dpm_fast takes `steps`, the others
    `sigma_grid`."""
    K = load_sampling()
    ends = torch.tensor([sde.t_max, sde.t_min], dtype=torch.float64)
    a_max, a_min = (float(v) for v in sde.marginal(ends)[0])
    counter = [0]
    model = denoiser(score_fn, sde, counter)
    if name == "dpm_fast":
        s_max, s_min = (float(v) for v in sde.sigma_ratio(ends))
        y = K.sample_dpm_fast(model, x_T / a_max, s_min, s_max, steps, disable=True, **options)
    else:
        y = getattr(K, "sample_" + name)(model, x_T / a_max, sigma_grid.to(x_T.dtype), disable=True, **options)
    return a_min * y, counter[0]
