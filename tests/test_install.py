"""The light core install: what `import sdekit` loads, extras named when missing, networks under `sdekit_models`.

The slow test builds a fresh virtual environment with `pip install -c constraints.txt .` (no extras, pip's own
cache) and runs the library there; CI runs it after the default suite (.ci/run).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdekit._imports import EXTRAS, import_target, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("jax", "diffrax", "lineax", "torchsde", "matplotlib", "sklearn", "accelerate")


def test_import_sdekit_loads_no_optional_package():
    """In a fresh interpreter, `import sdekit` (and the public names of the API contract) import none of the extras
    and nothing of the command layer (sdekit.commands: argparse, printing, plots)."""
    code = ("import sys, sdekit\n"
            "from sdekit import sensitivity, simulate, sample\n"
            f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))\n"
            "print(sorted(m for m in sys.modules if m.startswith('sdekit.commands')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


def test_pyplot_draws_into_files_or_names_the_extra(monkeypatch):
    import matplotlib

    from sdekit._imports import pyplot

    matplotlib.use("svg")                                    # another non-interactive backend, chosen before
    assert pyplot("a plot").get_backend().lower() == "agg"
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # as if not installed
    with pytest.raises(ImportError, match=r"^loss.png needs matplotlib: pip install 'sdekit\[images\]'$"):
        pyplot("loss.png")


@pytest.mark.parametrize("module, feature, message", [
    ("sklearn.datasets", "the digits data set", "the digits data set needs scikit-learn: pip install 'sdekit[images]'"),
    ("matplotlib.pyplot", "loss.png", "loss.png needs matplotlib: pip install 'sdekit[images]'"),
    ("accelerate", "sdekit train", "sdekit train needs accelerate: pip install 'sdekit[train]'"),
    ("jax.numpy", "sdekit.interop.diffrax", "sdekit.interop.diffrax needs JAX: pip install 'sdekit[jax]'"),
])
def test_require_names_the_extra(monkeypatch, module, feature, message):
    top = module.partition(".")[0]
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, top, None)              # as if not installed
    with pytest.raises(ImportError) as e:
        require(module, feature)
    assert str(e.value) == message


def test_require_returns_the_module_and_refuses_core_packages():
    import numpy

    assert require("matplotlib.pyplot", "a plot").__name__ == "matplotlib.pyplot"
    assert set(EXTRAS) >= {"jax", "diffrax", "lineax", "torchsde", "accelerate", "sklearn", "matplotlib"}
    with pytest.raises(ValueError, match="not an optional dependency"):
        require("numpy", "anything")
    assert numpy is not None


def test_network_targets_new_and_legacy_names(monkeypatch, tmp_path):
    """Configs name sdekit_models.*; a legacy models.* target is read as sdekit_models.* where no `models` package
    exists, and a user's own `models` package is imported as written."""
    from sdekit_models.mlp import MLP
    from sdekit_models.unet import UNet

    assert import_target("sdekit_models.mlp:MLP") is MLP
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        monkeypatch.delitem(sys.modules, name)
    # no top-level `models` anywhere on the path (an installed wheel, run from any folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".").resolve() / "models").is_dir()])
    assert import_target("models.mlp:MLP") is MLP
    assert import_target("models.unet:UNet") is UNet
    assert "models" not in sys.modules

    user = tmp_path / "models"                                # a user's own package called models
    user.mkdir()
    (user / "__init__.py").write_text("")
    (user / "mlp.py").write_text("class MLP:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_target("models.mlp:MLP") is not MLP
    assert import_target("models.mlp:MLP").__module__ == "models.mlp"

    with pytest.raises(ModuleNotFoundError, match="sdekit_models.nothere"):
        import_target("sdekit_models.nothere:Net")
    with pytest.raises(AttributeError, match="'sdekit_models.mlp' has no attribute 'Nope'"):
        import_target("sdekit_models.mlp:Nope")
    with pytest.raises(ValueError, match="module:Class"):
        import_target("sdekit_models.mlp")


def test_shipped_configs_name_installed_networks():
    from sdekit.config import load_config
    from sdekit.training import build_network

    for name, shape in (("ring", (2,)), ("digits", (1, 8, 8)), ("digits_edm", (1, 8, 8))):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.model.target.startswith("sdekit_models."), cfg.model.target
        assert type(build_network(cfg.model, shape)).__module__.startswith("sdekit_models.")


# --- a fresh environment with the core install only ------------------------------------------------------------
CHECK = r'''
import importlib, importlib.util, json, math, sys, time
t0 = time.perf_counter()
import torch
import sdekit
from sdekit import sensitivity

OPTIONAL = {optional!r}
report = {{"loaded_after_import": sorted(m for m in OPTIONAL if m in sys.modules)}}

# sample an exact Gaussian mixture; the per-mode weights must match the mixture's
sde = sdekit.VPSDE()
gmm = sdekit.data.ring(n_modes=4)
gen = torch.Generator().manual_seed(0)
x = sdekit.sample(gmm.score_fn(sde), sde, (4000, 2), sampler="heun", steps=40, generator=gen)
report["mode_weight_error"] = float(sdekit.metrics.mode_weight_error(x, gmm))

# simulate GBM and its forward sensitivity on the same increments, against the closed forms
try:
    from sdekit import simulate
    assert callable(simulate)
except (ImportError, AssertionError):
    from sdekit.simulate import simulate
f = lambda t, x, th: th[0] * x
g = lambda t, x, th: th[1] * x
theta = torch.tensor([0.3, 0.4], dtype=torch.float64)
x0 = torch.ones(2000, 1, dtype=torch.float64)
ts = torch.linspace(0.0, 1.0, 401, dtype=torch.float64)
dW = sensitivity.brownian_increments(ts, (2000, 1), torch.Generator().manual_seed(1))
xT = simulate(f, g, x0, theta, ts, dW)
exact = x0 * torch.exp((theta[0] - theta[1] ** 2 / 2) + theta[1] * dW.sum(0))
report["simulate_error"] = float((xT - exact).abs().mean() / exact.abs().mean())
xs, J = sensitivity.forward(f, g, x0, theta, ts, dW)
report["forward_vs_simulate"] = float((xs[-1] - xT).abs().max())
report["dX_dmu_error"] = float((J[-1, :, 0, 0] - xs[-1, :, 0]).abs().mean() / xs[-1].abs().mean())   # dX_T/dmu = T X_T

# networks: installed as sdekit_models, no top-level models
import sdekit_models.mlp, sdekit_models.unet
sdekit_models.unet.UNet((1, 8, 8), channels=8)
report["sdekit_models"] = sdekit_models.mlp.__file__
report["models_importable"] = importlib.util.find_spec("models") is not None

# adapters and features whose extra is missing name it
errors = {{}}
for name in ("sdekit.interop.diffrax", "sdekit.interop.torchsde"):
    try:
        importlib.import_module(name)
        errors[name] = None
    except ImportError as e:
        errors[name] = str(e)
try:
    from sdekit.sensitivity import adjoint
    adjoint.mean_gradient(f, g, x0[:4], theta, ts[:3], dW[:2, :4], lambda x: x.sum(-1), "euler", backend="torchsde")
    errors["adjoint"] = None
except ImportError as e:
    errors["adjoint"] = str(e)
report["errors"] = errors
report["loaded_at_end"] = sorted(m for m in OPTIONAL if m in sys.modules)
report["installed_optional"] = sorted(m for m in OPTIONAL if importlib.util.find_spec(m) is not None)
report["seconds"] = time.perf_counter() - t0
print(json.dumps(report))
'''


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _check(python: Path, cwd: Path) -> dict:
    import json

    out = _run([str(python), "-c", CHECK.format(optional=OPTIONAL)], cwd=cwd,
               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_core(report: dict, editable_root: Path | None = None) -> None:
    assert report["loaded_after_import"] == [] and report["loaded_at_end"] == [], report
    assert report["installed_optional"] == [], report            # the core install pulled no extra
    assert report["mode_weight_error"] < 0.03, report
    assert report["simulate_error"] < 0.02, report               # Euler-Maruyama at 400 steps vs the exact GBM path
    assert report["forward_vs_simulate"] < 1e-12, report
    assert report["dX_dmu_error"] < 0.02, report
    assert not report["models_importable"], report
    where = Path(report["sdekit_models"]).resolve()
    if editable_root is None:
        assert "site-packages" in where.parts, where
    else:
        assert where == (editable_root / "models" / "mlp.py").resolve(), where
    errors = report["errors"]
    assert errors["sdekit.interop.diffrax"] == "sdekit.interop.diffrax needs JAX: pip install 'sdekit[jax]'", errors
    assert errors["sdekit.interop.torchsde"] == "sdekit.interop.torchsde needs torchsde: pip install 'sdekit[torchsde]'", errors
    assert errors["adjoint"] is not None and "pip install 'sdekit[torchsde]'" in errors["adjoint"], errors


@pytest.mark.slow
def test_core_install_in_a_fresh_venv(tmp_path):
    """`pip install -c constraints.txt .` with no extras (normal, then editable): sdekit imports, samples an exact
    mixture, simulates and differentiates an SDE; no `models` package, no optional package installed or loaded;
    the adapters and the torchsde adjoint name their extras."""
    src = tmp_path / "src"                                        # the files a source distribution carries
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "constraints.txt"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("sdekit", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    work = tmp_path / "work"                                      # an empty working directory: no models/ beside it
    work.mkdir()
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    times = {}

    t = time.perf_counter()
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(python), "-m", "pip", "install", "-q", "-c", str(src / "constraints.txt"), str(src)], cwd=work)
    times["venv + install"] = time.perf_counter() - t
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert (site / "sdekit_models" / "unet.py").exists() and not (site / "models").exists()
    t = time.perf_counter()
    _assert_core(_check(python, work))
    times["check"] = time.perf_counter() - t

    t = time.perf_counter()
    _run([str(python), "-m", "pip", "install", "-q", "-c", str(src / "constraints.txt"), "-e", str(src)], cwd=work)
    times["editable reinstall"] = time.perf_counter() - t
    _assert_core(_check(python, work), editable_root=src)
    print("core install timings (s):", {k: round(v, 1) for k, v in times.items()})
