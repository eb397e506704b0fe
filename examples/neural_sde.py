"""Training a neural SDE: drift and diffusion networks fitted to paths of a double-well Langevin SDE, with
sdekit's adjoint and with torchsde's sdeint_adjoint on the same model, data and Brownian paths.

The truth is dX = (X - X^3) dt + sigma dW (sigma = 0.5; additive noise, so its Ito and Stratonovich drifts agree),
simulated by Euler on a grid 8x finer than the model's and observed on the model's grid t_n = n h, h = 2^-5. The
model is a Stratonovich SDE dX = f(X) dt + g(X) o dW with f an MLP (1 -> W -> W -> 1, tanh) and g = softplus of an
MLP, solved by reversible Heun on the observation grid, driven by the same Brownian motion as the data (the coarse
increments are sums of the fine ones). The loss is the mean squared distance between model and data paths at every
observation time, whose minimiser is the true drift and diffusion. Each iteration takes a minibatch of paths and
one Adam step. Two copies of the model start from the same weights and train side by side, iteration by
iteration, in alternating order:

  sdekit     sdekit.simulate(model.f, model.g, x0, theta, ts, dW=dW, scheme="reversible_heun", save="path",
                             adjoint=True, adjoint_params=model's parameters)
  torchsde   torchsde.sdeint_adjoint(sde, x0, ts, bm=GridBrownian(ts, dW), dt=h, method="reversible_heun",
                                     adjoint_method="adjoint_reversible_heun", adjoint_params=model's parameters)

Both compute backprop's gradient through the same discrete reversible-Heun solve, without a tape (the reversible
adjoint of Kidger et al. 2021), so at the first step they must agree to round-off in float64 (reported: max
relative difference over every weight, and against plain backprop through sdekit's eager solve). Reported side by
side: seconds per iteration (median and quartiles over the alternating iterations, and the median of the paired
per-iteration ratios; under a shared CPU these are noisy, read them as ranges), seconds per gradient at a larger
batch (--memory-paths, alternating), and the peak memory one gradient adds above what the process holds before it
(VmHWM, reset through /proc/self/clear_refs, each measurement in a fork of one fresh process, at the training N
and at 4N; plain backprop through sdekit's solve beside them for contrast: its tape grows with N). Then the
learned drift against the true one: the model's Ito drift f + g g'/2 (the Stratonovich model's drift in the
truth's calculus) against x - x^3, RMS evenly over the data's range and at the data's own points, before and after
training.

    .venv/bin/python examples/neural_sde.py            # about 4 minutes on 2 CPU cores (6 under load)
    .venv/bin/python examples/neural_sde.py --quick    # about 20 s: fewer paths and iterations

Writes --out/neural_sde.png (loss curves of both trainings; learned drift and diffusion against the truth) next to
neural_sde.json (configuration, gradient agreement, timings, memory, curves, drift errors).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

import sdekit

DTYPE = torch.float64
SIGMA = 0.5
H = 2.0 ** -5          # the model's step: a power of two, so torchsde's summed times land on the grid exactly
FINE = 8               # data substeps per model step
X_RANGE = (-1.6, 1.6)  # where the data lives (the two wells at +-1 and the barrier between them)


def true_drift(x: Tensor) -> Tensor:
    return x - x**3


# --- the model ------------------------------------------------------------------------------------------------
class NeuralSDE(nn.Module):
    """dX = f(X) dt + g(X) o dW (Stratonovich, diagonal noise) with f and g small MLPs; f(t, x, theta) and
    g(t, x, theta) are sdekit fields (theta unused: the weights are the parameters), x: (B, 1)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.drift = nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                   nn.Linear(width, 1))
        self.diffusion = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))

    def f(self, t, x: Tensor, theta=None) -> Tensor:
        return self.drift(x)

    def g(self, t, x: Tensor, theta=None) -> Tensor:
        return nn.functional.softplus(self.diffusion(x))

    def ito_drift(self, x: Tensor) -> Tensor:
        """f + g g'/2: the Ito drift of the Stratonovich model (1-D), comparable with the truth's (B, 1)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            gx = self.g(None, x)
            dg = torch.autograd.grad(gx.sum(), x)[0]
        return (self.f(None, x) + 0.5 * gx * dg).detach()


class TorchsdeSDE(nn.Module):
    """The same model as torchsde's SDE interface: f(t, y), g(t, y), noise_type and sde_type attributes."""

    noise_type, sde_type = "diagonal", "stratonovich"

    def __init__(self, model: NeuralSDE):
        super().__init__()
        self.model = model

    def f(self, t, y):
        return self.model.f(t, y)

    def g(self, t, y):
        return self.model.g(t, y)


# --- data -----------------------------------------------------------------------------------------------------
def make_data(paths: int, T: float, seed: int) -> dict:
    """Paths of the true SDE on the model grid ts (N+1,): x (N+1, paths, 1), and the model-grid Brownian increments
    dW (N, paths, 1), the sums of the FINE substeps' increments that drove the data."""
    N = round(T / H)
    gen = torch.Generator().manual_seed(seed)
    x0 = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * torch.rand(paths, 1, generator=gen, dtype=DTYPE)
    ts_fine = torch.arange(N * FINE + 1, dtype=DTYPE) * (H / FINE)
    dW_fine = sdekit.solvers.brownian_increments(ts_fine, (paths, 1), gen)
    theta = torch.zeros(0, dtype=DTYPE)
    x_fine = sdekit.simulate(lambda t, x, th: true_drift(x), lambda t, x, th: SIGMA * torch.ones_like(x), x0, theta,
                             ts_fine, dW_fine, "euler", save="path")
    return {"ts": ts_fine[::FINE].clone(), "x": x_fine[::FINE].clone(), "dW": dW_fine.reshape(N, FINE, paths, 1).sum(1)}


# --- one gradient by each backend -----------------------------------------------------------------------------
def path_loss(xs: Tensor, target: Tensor) -> Tensor:
    return ((xs - target) ** 2).mean()


def grads_sdekit(model: NeuralSDE, ts: Tensor, dW: Tensor, target: Tensor, adjoint: bool = True):
    """(loss, grads) with sdekit: adjoint=True its native reversible adjoint, False plain backprop (eager loop)."""
    params = tuple(model.parameters())
    theta = torch.zeros(0, dtype=DTYPE)
    xs = sdekit.simulate(model.f, model.g, target[0], theta, ts, dW=dW, scheme="reversible_heun", save="path",
                         **({"adjoint": True, "adjoint_params": params} if adjoint else {}))
    loss = path_loss(xs, target)
    return loss.detach(), torch.autograd.grad(loss, params)


def grads_torchsde(model: NeuralSDE, ts: Tensor, dW: Tensor, target: Tensor):
    """(loss, grads) with torchsde's sdeint_adjoint, reversible Heun both ways, on a path through the same dW."""
    import torchsde

    from sdekit.interop.torchsde import GridBrownian
    params = tuple(model.parameters())
    bm = GridBrownian(ts, dW, strict=True)          # returns exactly dW[n] over [t_n, t_n+1]; refuses other queries
    xs = torchsde.sdeint_adjoint(TorchsdeSDE(model), target[0], ts, bm=bm, dt=H, method="reversible_heun",
                                 adjoint_method="adjoint_reversible_heun", adjoint_params=params)
    loss = path_loss(xs, target)
    return loss.detach(), torch.autograd.grad(loss, params)


BACKENDS = {"sdekit": grads_sdekit, "torchsde": grads_torchsde,
            "sdekit_backprop": lambda *a: grads_sdekit(*a, adjoint=False)}


def max_rel_diff(a: tuple, b: tuple) -> float:
    """max over tensors of max |a - b| / max |b|."""
    return max(float((u - v).abs().max() / v.abs().max().clamp_min(1e-300)) for u, v in zip(a, b))


def drift_rms(model: NeuralSDE, x: Tensor | None = None) -> float:
    """RMS of the model's Ito drift minus x - x^3 at the points x (M, 1), by default evenly over X_RANGE."""
    x = torch.linspace(*X_RANGE, 201, dtype=DTYPE)[:, None] if x is None else x
    return float(((model.ito_drift(x) - true_drift(x)) ** 2).mean().sqrt())


# --- training -------------------------------------------------------------------------------------------------
def train(data: dict, iters: int, batch: int, lr: float, width: int, seed: int, progress: bool = True) -> dict:
    """Two identical models trained side by side (sdekit's adjoint, torchsde's), alternating which goes first."""
    torch.manual_seed(seed)
    init = NeuralSDE(width).to(DTYPE)
    models = {"sdekit": init, "torchsde": copy.deepcopy(init)}
    initial = copy.deepcopy(init)
    opts = {k: torch.optim.Adam(m.parameters(), lr=lr) for k, m in models.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    paths = data["x"].shape[1]
    curves = {k: [] for k in models}
    seconds = {k: [] for k in models}
    first = None
    bar = tqdm(range(iters), desc="training", disable=not progress)
    for it in bar:
        idx = torch.randperm(paths, generator=gen)[:batch]
        target, dW = data["x"][:, idx], data["dW"][:, idx]
        order = list(models) if it % 2 == 0 else list(models)[::-1]
        grads = {}
        for k in order:
            t0 = time.perf_counter()
            loss, grads[k] = BACKENDS[k](models[k], data["ts"], dW, target)
            for p, gr in zip(models[k].parameters(), grads[k]):
                p.grad = gr
            opts[k].step()
            seconds[k].append(time.perf_counter() - t0)
            curves[k].append(float(loss))
        if it == 0:                               # both models were equal: the gradients must be too
            _, bp = grads_sdekit(initial, data["ts"], dW, target, adjoint=False)
            first = {"sdekit_vs_torchsde": max_rel_diff(grads["sdekit"], grads["torchsde"]),
                     "sdekit_vs_backprop": max_rel_diff(grads["sdekit"], bp),
                     "torchsde_vs_backprop": max_rel_diff(grads["torchsde"], bp)}
        bar.set_postfix(loss=f"{curves['sdekit'][-1]:.4f}")
    return {"models": models, "initial": initial, "curves": curves, "seconds": seconds, "first_gradients": first}


def timing_summary(seconds: dict) -> dict:
    """Median and quartiles of s/iteration per backend (the first iteration, with one-off costs, left out), and the
    median of the paired per-iteration ratios sdekit / torchsde."""
    out = {}
    for k, s in seconds.items():
        s = s[1:] if len(s) > 2 else s
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        out[k] = {"median": statistics.median(s), "q1": q[0], "q3": q[2], "iterations": len(s)}
    pairs = list(zip(seconds["sdekit"], seconds["torchsde"]))
    pairs = pairs[1:] if len(pairs) > 2 else pairs
    out["ratio_sdekit_over_torchsde"] = statistics.median(a / b for a, b in pairs)
    return out


def gradient_timing(paths: int, T: float, width: int, seed: int, repeats: int = 6) -> dict:
    """Seconds per gradient (no optimiser step) of each backend at another batch size, alternating the order,
    `repeats` rounds (the first left out): median per backend and median of the paired ratios sdekit / torchsde."""
    data = make_data(paths, T, seed)
    torch.manual_seed(seed)
    model = NeuralSDE(width).to(DTYPE)
    args = (model, data["ts"], data["dW"], data["x"])
    seconds = {k: [] for k in BACKENDS}
    for r in range(repeats):
        for k in (list(BACKENDS) if r % 2 == 0 else list(BACKENDS)[::-1]):
            t0 = time.perf_counter()
            BACKENDS[k](*args)
            seconds[k].append(time.perf_counter() - t0)
    out = {k: statistics.median(v[1:]) for k, v in seconds.items()}
    out["ratio_sdekit_over_torchsde"] = statistics.median(a / b for a, b in zip(seconds["sdekit"][1:],
                                                                               seconds["torchsde"][1:]))
    out["paths"] = paths
    return out


# --- memory, one backend per fresh process -------------------------------------------------------------------
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_probes(jobs: list[tuple[str, float]], paths: int, width: int, seed: int, repeats: int = 3) -> list[dict]:
    """In this (fresh) process: one warm-up gradient per backend on a tiny problem (code paths loaded), then per
    (backend, T) `repeats` forked children, each running the tiny gradient again (mapping the library pages it uses)
    and measuring the peak resident memory one gradient adds above its resident memory just before it (MiB, VmHWM
    after a reset through /proc/self/clear_refs, the heap's free pages returned to the OS first), and its time; the
    median is reported. Every child starts from the same parent state, so no measurement reuses memory another one
    freed."""
    torch.manual_seed(seed)
    model = NeuralSDE(width).to(DTYPE)
    tiny = make_data(2, 4 * H, seed)
    for fn in BACKENDS.values():
        fn(model, tiny["ts"], tiny["dW"], tiny["x"])
    rows = []
    for backend, t_end in jobs:
        data = make_data(paths, t_end, seed)
        runs = [_forked(backend, model, tiny, data) for _ in range(repeats)]
        rows.append({"backend": backend, "steps": round(t_end / H), "paths": paths,
                     "peak_extra_mib": statistics.median(r["peak_extra_mib"] for r in runs),
                     "peak_extra_mib_runs": [r["peak_extra_mib"] for r in runs]})
    return rows


def _trim_heap() -> None:
    """glibc's malloc_trim(0): return the heap's free pages to the OS (no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _forked(backend: str, model: NeuralSDE, tiny: dict, data: dict) -> dict:
    """One gradient in a forked child: the peak resident memory it adds (MiB)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # the child: measure, report through the pipe, exit at once
        try:
            # a fork shares the libraries' pages without mapping them: touch the code paths again first
            BACKENDS[backend](model, tiny["ts"], tiny["dW"], tiny["x"])
            _trim_heap()                    # free heap pages the parent left resident would be reused unseen
            Path("/proc/self/clear_refs").write_text("5")          # peak (VmHWM) := current resident size
            before = _status_kib("VmRSS")
            BACKENDS[backend](model, data["ts"], data["dW"], data["x"])
            row = {"peak_extra_mib": (_status_kib("VmHWM") - before) / 1024}
        except Exception as err:                       # noqa: BLE001  (reported by the parent)
            row = {"error": repr(err)}
        os.write(write, json.dumps(row).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        row = json.loads(fh.read())
    os.waitpid(pid, 0)
    if "error" in row:
        raise RuntimeError(f"memory probe {backend}: {row['error']}")
    return row


def measure_memory(paths: int, T: float, width: int, seed: int, repeats: int) -> list[dict]:
    """memory_probes for each backend at N and 4N steps, in one fresh subprocess (Linux: /proc and fork)."""
    if not Path("/proc/self/clear_refs").exists():
        print("peak memory is read from /proc/self (Linux); skipped here")
        return []
    cmd = [sys.executable, __file__, "--memory-probe", "--batch", str(paths), "--paths", str(paths), "--T", str(T),
           "--width", str(width), "--seed", str(seed), "--memory-repeats", str(repeats)]
    # a fixed mmap threshold: freed tensors above 64 KiB go back to the OS at once (glibc otherwise raises the
    # threshold after the first such free and keeps later ones in its heap), so the peak follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the memory probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- report ---------------------------------------------------------------------------------------------------
def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, style in (("sdekit", "-"), ("torchsde", "--")):
        ax[0].plot(res["curves"][k], style, label=f"{k} adjoint")
    ax[0].set(yscale="log", xlabel="iteration", ylabel="path MSE (minibatch)", title="loss")
    ax[0].legend()
    x = torch.linspace(*X_RANGE, 201, dtype=DTYPE)[:, None]
    ax[1].plot(x[:, 0], true_drift(x)[:, 0], "k", lw=2.5, label="true x - x^3")
    ax[1].plot(x[:, 0], res["initial"].ito_drift(x)[:, 0], ":", color="grey", label="initial model")
    for k, style in (("sdekit", "-"), ("torchsde", "--")):
        ax[1].plot(x[:, 0], res["models"][k].ito_drift(x)[:, 0], style, label=f"learned ({k})")
    ax[1].set(xlabel="x", ylabel="Ito drift", title="drift: learned against true")
    ax[1].legend()
    ax[2].axhline(SIGMA, color="k", lw=2.5, label=f"true sigma = {SIGMA}")
    ax[2].plot(x[:, 0], res["initial"].g(None, x).detach()[:, 0], ":", color="grey", label="initial model")
    for k, style in (("sdekit", "-"), ("torchsde", "--")):
        ax[2].plot(x[:, 0], res["models"][k].g(None, x).detach()[:, 0], style, label=f"learned ({k})")
    ax[2].set(xlabel="x", ylabel="g(x)", title="diffusion: learned against true")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~20 s run: fewer paths, a shorter horizon, fewer iterations")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default 300; --quick 40)")
    p.add_argument("--paths", type=int, default=None, help="data paths (default 1024; --quick 256)")
    p.add_argument("--batch", type=int, default=None, help="paths per iteration (default 128; --quick 64)")
    p.add_argument("--T", type=float, default=None, help="horizon (default 3; --quick 1.5); N = T / 2^-5 steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--width", type=int, default=32, help="hidden width of the drift network")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-paths", type=int, default=None,
                   help="paths per gradient in the memory probes (default 1024; --quick: --batch)")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help="forked measurements per probe, median reported (default 3; --quick 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes (subprocesses)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="runs/neural_sde")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = {"iters": 40, "paths": 256, "batch": 64, "T": 1.5}
    full = {"iters": 300, "paths": 1024, "batch": 128, "T": 3.0}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.memory_paths is None:
        args.memory_paths = args.batch if args.quick else 1024
    if args.memory_repeats is None:
        args.memory_repeats = 1 if args.quick else 3
    if (args.iters < 2 or args.batch < 1 or args.paths < args.batch or args.T <= 0 or args.width < 1
            or args.memory_paths < 1 or args.memory_repeats < 1):
        p.error("need --iters >= 2, 1 <= --batch <= --paths, --T > 0, and --width, --memory-paths, --memory-repeats "
                ">= 1")
    if not math.isclose(args.T / H, round(args.T / H)):
        p.error(f"--T must be a multiple of the step {H}")
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        jobs = [(b, args.T * k) for k in (1, 4) for b in BACKENDS]
        print(json.dumps(memory_probes(jobs, args.batch, args.width, args.seed, args.memory_repeats)))
        return 0

    t_start = time.time()
    data = make_data(args.paths, args.T, args.seed)
    res = train(data, args.iters, args.batch, args.lr, args.width, args.seed, progress=not args.no_progress)
    timing = timing_summary(res["seconds"])
    timing_wide = None
    if args.memory_paths != args.batch:
        if not args.no_progress:
            print(f"timing gradients at {args.memory_paths} paths ...", flush=True)
        timing_wide = gradient_timing(args.memory_paths, args.T, args.width, args.seed)
    if not args.no_progress:
        print("measuring peak memory (one subprocess) ...", flush=True)
    memory = [] if args.no_memory else measure_memory(args.memory_paths, args.T, args.width, args.seed,
                                                      args.memory_repeats)
    visited = data["x"].reshape(-1, 1)                 # the data's occupation: where the paths spend their time
    drift = {"initial_rms": drift_rms(res["initial"]), **{f"{k}_rms": drift_rms(m) for k, m in res["models"].items()},
             "initial_rms_on_data": drift_rms(res["initial"], visited),
             **{f"{k}_rms_on_data": drift_rms(m, visited) for k, m in res["models"].items()}}
    x = torch.linspace(*X_RANGE, 201, dtype=DTYPE)[:, None]
    sigma_learned = {k: float(m.g(None, x).detach().mean()) for k, m in res["models"].items()}
    fg = res["first_gradients"]
    N = round(args.T / H)
    print(f"double-well neural SDE, {args.paths} paths, {N} steps of {H}, batch {args.batch}, {args.iters} iterations, "
          f"float64")
    print(f"first-step gradients, max relative difference: sdekit vs torchsde {fg['sdekit_vs_torchsde']:.2e}, "
          f"sdekit vs backprop {fg['sdekit_vs_backprop']:.2e}, torchsde vs backprop {fg['torchsde_vs_backprop']:.2e}")
    print(f"{'':<10} {'s/iteration (median [q1, q3])':>32}")
    for k in ("sdekit", "torchsde"):
        t = timing[k]
        print(f"{k:<10} {t['median']:>14.4f} [{t['q1']:.4f}, {t['q3']:.4f}]")
    print(f"sdekit / torchsde time per iteration (median of paired ratios): {timing['ratio_sdekit_over_torchsde']:.2f}")
    if timing_wide is not None:
        print(f"one gradient at {timing_wide['paths']} paths (median of 5, alternating): "
              + ", ".join(f"{k} {timing_wide[k]:.3f} s" for k in BACKENDS)
              + f"; sdekit / torchsde {timing_wide['ratio_sdekit_over_torchsde']:.2f}")
    if memory:
        print(f"peak memory added by one gradient (MiB), {args.memory_paths} paths, each row in a fresh fork:")
        for r in memory:
            print(f"  {r['backend']:<16} N = {r['steps']:>4}: {r['peak_extra_mib']:8.1f} MiB")
    print(f"drift RMS error against x - x^3, evenly on {X_RANGE} / at the data's points: initial "
          f"{drift['initial_rms']:.3f} / {drift['initial_rms_on_data']:.3f}, learned sdekit "
          f"{drift['sdekit_rms']:.3f} / {drift['sdekit_rms_on_data']:.3f}, torchsde {drift['torchsde_rms']:.3f} / "
          f"{drift['torchsde_rms_on_data']:.3f}; mean learned g: "
          + ", ".join(f"{k} {v:.3f}" for k, v in sigma_learned.items()) + f" (true {SIGMA})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"config": {**{k: v for k, v in vars(args).items() if k != "memory_probe"}, "steps": N, "h": H,
                          "sigma": SIGMA, "data_substeps": FINE, "dtype": "float64"},
               "first_gradients_max_rel_diff": fg, "seconds_per_iteration": timing,
               "seconds_per_gradient_at_memory_paths": timing_wide, "memory": memory,
               "drift": drift, "learned_sigma_mean": sigma_learned, "curves": res["curves"],
               "seconds_total": time.time() - t_start}
    (out / "neural_sde.json").write_text(json.dumps(summary, indent=1))
    plot(res, out / "neural_sde.png")
    print(f"wrote {out / 'neural_sde.json'} and {out / 'neural_sde.png'} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
