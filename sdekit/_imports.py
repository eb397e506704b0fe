"""What sdekit imports by name: optional dependencies (`require`) and the `module:Class` targets of configs.

Optional dependencies: import one, or raise an ImportError that names the extra to install.

The core install (torch, numpy, scipy, einops, safetensors, pyyaml, tqdm) runs the library; these extras add
the features that need more (pyproject.toml lists them):

    [jax]       jax, diffrax, lineax     sdekit.interop.diffrax (JAX schedules, exports, diffrax solves, gradients)
    [torchsde]  torchsde                 sdekit.interop.torchsde, sensitivity.adjoint
    [train]     accelerate               training and distributed sampling
    [images]    scikit-learn, matplotlib the digits data set, plots
    [all]       every extra above

`require("diffrax", "sdekit.interop.diffrax")` returns the module or raises
ImportError("sdekit.interop.diffrax needs JAX: pip install 'sdekit[jax]'").
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "PEERS", "PEERS_HINT", "require", "check_extras", "pyplot", "missing_extra", "import_target"]

# top-level package -> (what a person would call it, the extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "jax": ("JAX", "jax"),
    "jaxlib": ("JAX", "jax"),
    "diffrax": ("JAX (diffrax)", "jax"),
    "lineax": ("JAX (lineax)", "jax"),
    "equinox": ("JAX (equinox)", "jax"),
    "torchsde": ("torchsde", "torchsde"),
    "accelerate": ("accelerate", "train"),
    "sklearn": ("scikit-learn", "images"),
    "matplotlib": ("matplotlib", "images"),
}


# The peers the sampler comparisons measure (`sdekit frontier`, `sdekit samplers --peers`): the [peers] extra, and
# k-diffusion installed apart without its dependencies (they break this install; see pyproject.toml).
PEERS: dict[str, str] = {"diffusers": "diffusers", "torchdiffeq": "torchdiffeq", "k_diffusion": "k-diffusion"}
PEERS_HINT = ("pip install -c constraints.txt 'sdekit[peers]' && "
              "pip install -c constraints.txt --no-deps k-diffusion")


def check_extras(feature: str, *packages: str) -> None:
    """Raise one ImportError naming every missing package among `packages` (keys of EXTRAS or PEERS) and the one
    command that installs them all, before a command starts its work. Looks packages up without importing them.
    """
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if not missing:
        return
    labels = list(dict.fromkeys(EXTRAS[p][0] if p in EXTRAS else PEERS[p] for p in missing))
    if all(p in PEERS for p in missing):
        hint = PEERS_HINT
    else:
        extras = sorted({EXTRAS[p][1] if p in EXTRAS else "peers" for p in missing})
        hint = f"pip install -c constraints.txt 'sdekit[{','.join(extras)}]'"
        if "k_diffusion" in missing:
            hint += " && pip install -c constraints.txt --no-deps k-diffusion"
    raise ImportError(f"{feature} needs {', '.join(labels)} (not installed): {hint}")


def missing_extra(package: str, feature: str) -> ImportError:
    """The ImportError for `feature` when `package` (a key of EXTRAS) is not installed."""
    label, extra = EXTRAS[package]
    return ImportError(f"{feature} needs {label}: pip install 'sdekit[{extra}]'")


def require(module: str, feature: str) -> ModuleType:
    """importlib.import_module(module); if its top-level package is missing, an ImportError naming the extra.

    module: a dotted module name whose top-level package is a key of EXTRAS (e.g. "jax.numpy", "matplotlib.pyplot");
    feature: what needs it, as the user would call it (e.g. "sdekit.interop.diffrax", "loss.png").
    A missing module that the same extra does not install (a broken install) is re-raised unchanged.
    """
    top = module.partition(".")[0]
    if top not in EXTRAS:
        raise ValueError(f"{top!r} is not an optional dependency; expected one of {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]          # the package itself, or one its extra also installs
        if missing not in EXTRAS or EXTRAS[missing][1] != EXTRAS[top][1]:
            raise
        raise missing_extra(top, feature) from e


def pyplot(feature: str) -> ModuleType:
    """matplotlib.pyplot drawing into files (the Agg backend, no display needed), or an ImportError naming [images].

    feature: what the plot is, as the user would call it (e.g. "loss.png").
    """
    require("matplotlib", feature).use("Agg")
    return require("matplotlib.pyplot", feature)


def save_figure(fig, path, dpi: int = 120) -> None:
    """Write a matplotlib figure to `path` atomically (a temporary file, then a rename) and close it."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_suffix(".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    pyplot("plots").close(fig)
    os.replace(tmp, path)


def import_target(target: str):
    """The object a config names as 'module:attr', e.g. 'sdekit_models.mlp:MLP' -> the MLP class.

    The networks in the repository's models/ folder install as the package `sdekit_models`. Configs and
    checkpoints written before named them `models.mlp:MLP` and `models.unet:UNet`; such a target is imported
    as written when a top-level package `models` exists (a user's own, or the repository folder on sys.path),
    and otherwise read as `sdekit_models.` + the rest (`models.unet:UNet` -> `sdekit_models.unet:UNet`).
    Raises ImportError or AttributeError naming what is missing.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"a target looks like 'module:Class', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        legacy = module_name == "models" or module_name.startswith("models.")
        if not legacy or e.name != "models":
            raise
        module = importlib.import_module("sdekit_models" + module_name[len("models"):])
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}") from None
