"""Training loop for denoising score matching, on accelerate (one process, several, or several machines).

Reading order: build the pieces from the config, then one loop of optimiser steps.

Determinism by construction: the data order, the diffusion times, the noise and the dropout masks of step s
are pure functions of (seed, s), drawn for the whole global batch and sliced per process. Hence
  * N processes x batch B give the same update as 1 process x batch N B (to round-off);
  * resuming needs only (weights, EMA, optimiser, scheduler, step): a killed and resumed run ends
    with the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ._imports import import_target, require
from .checkpoint import (
    CheckpointError,
    FolderInUseError,
    atomic_write_text,
    folder_lock,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    prune_checkpoints,
    save_checkpoint,
)
from .config import Config, ConfigError, ModelConfig, SDEConfig, from_dict, to_dict
from .data import load_training_data
from .images import image_bin_width
from .losses import dsm_loss, sample_t
from .precond import Denoiser
from .rng import derive_seed
from .sde import SDE, SDES, make_sde

__all__ = ["build_sde", "build_network", "build_denoiser", "check_model_fits_data", "batch_indices", "step_generator",
           "KeyedDropout", "EMA", "launch_kwargs", "check_launch", "exclusive_folder", "check_run_folder", "train",
           "load_trained", "resolve_checkpoint"]


# --- building blocks from a config --------------------------------------------------------------------
def build_sde(cfg: SDEConfig) -> SDE:
    kwargs = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "name" and v is not None}
    accepted = set(inspect.signature(SDES[cfg.name]).parameters)
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(f"sde.{key} does not apply to sde.name={cfg.name!r}; it takes {sorted(accepted)}")
    try:
        return make_sde(cfg.name, **kwargs)
    except ValueError as e:
        raise ConfigError(f"sde: {e}") from None


def build_network(cfg: ModelConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """Import `module:Class` from cfg.target (`sdekit._imports.import_target`); build Class(data_shape, **options)."""
    try:
        cls = import_target(cfg.target)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.target {cfg.target!r} cannot be imported: {e}") from None
    params = inspect.signature(cls).parameters
    unknown = [k for k in cfg.options if k not in params]
    if unknown:
        raise ConfigError(f"unknown model option 'model.options.{unknown[0]}' for {cfg.target}; "
                          f"it takes {list(params)[1:]}")
    return cls(data_shape, **cfg.options)


def build_denoiser(cfg: Config, data_shape: tuple[int, ...], net: nn.Module | None = None) -> Denoiser:
    sde = build_sde(cfg.sde)
    sigma_data = cfg.sde.sigma_data if (cfg.model.prediction == "edm" and cfg.sde.sigma_data) else cfg.model.sigma_data
    net = net if net is not None else build_network(cfg.model, data_shape)
    return Denoiser(net, sde, cfg.model.prediction, sigma_data)


def check_model_fits_data(denoiser: Denoiser, x: Tensor, target: str = "model") -> None:
    """One forward pass on two data points before training: the network's output must be shaped like the data."""
    c_noise = torch.zeros(x.shape[0], dtype=x.dtype)
    try:
        with torch.no_grad():
            out = denoiser.net(x, c_noise)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"model {target} does not accept data of shape {tuple(x.shape[1:])}: {e}") from None
    if out.shape != x.shape:
        raise ConfigError(f"model {target} maps data of shape {tuple(x.shape[1:])} to {tuple(out.shape[1:])}; "
                          "a score model must return the shape of its input")
    if out.dtype != x.dtype:
        raise ConfigError(f"model {target} returns {out.dtype} for {x.dtype} data")


def step_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    """The generator of optimisation step `step`: independent streams per step, reproducible from (seed, step)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "train_step", step))


def batch_indices(n: int, batch: int, step: int, seed: int) -> Tensor:
    """Indices (batch,) of step `step` when the data are visited in per-epoch random permutations.

    Position p = step * batch + i lies in epoch p // n at offset p % n; epoch e's permutation is
    seeded by (seed, e), so any step's batch is known without replaying the earlier ones.
    """
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(batch, dtype=torch.long)
    for e in torch.unique(epochs).tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "data_order", e)))
        mask = epochs == e
        out[mask] = perm[offsets[mask]]
    return out


_KEYED_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


class KeyedDropout:
    """Dropout masks keyed by (seed, step) and by each sample's row in the global batch, like every other draw.

    nn.Dropout draws from the global RNG: a resumed run, or N processes instead of one, would draw other masks.
    While installed on a network, each nn.Dropout / Dropout1d / Dropout2d / Dropout3d in training mode draws, at
    every call, the masks of the whole global batch (global_batch, *x.shape[1:]) from a generator seeded by
    (seed, step) afresh for each micro-batch, and keeps the rows of its own micro-batch, as the loop does for
    times and noise: a resumed run draws the same masks, and N processes or gradient accumulation draw the same
    mask for each sample as one process (costing the global batch's masks per micro-batch). A dropout whose
    input does not have the micro-batch as its first dimension draws masks keyed by (seed, step, micro-batch,
    rank) instead: exact on resume, not equal across process counts. Other random ops inside the network
    (say F.dropout called directly) draw from the global RNG, which the loop seeds by (seed, step, micro-batch,
    rank): also exact on resume only.
    """

    def __init__(self, net: nn.Module):
        self.modules = [m for m in net.modules() if isinstance(m, _KEYED_DROPOUT) and m.p > 0]
        self._batch: dict | None = None
        for m in self.modules:
            m.forward = functools.partial(self._forward, m)   # an instance attribute: DDP and hooks still call it

    def remove(self) -> None:
        """Give every dropout module back its own forward."""
        for m in self.modules:
            m.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def micro_batch(self, seed: int, step: int, rows: slice, global_batch: int, fallback_key: int):
        """Draw masks for the rows `rows` of the global batch of `global_batch` samples at optimisation step `step`."""
        self._batch = {"key": derive_seed(seed, "dropout", step), "rows": rows, "n": global_batch,
                       "fallback_key": fallback_key, "gens": {}}
        try:
            yield
        finally:
            self._batch = None

    def _forward(self, m: nn.Module, x: Tensor) -> Tensor:
        b = self._batch
        if not m.training or b is None:
            return type(m).forward(m, x)
        if m.p >= 1:
            return x * 0
        # DropoutNd drops whole channels
        shape = tuple(x.shape) if type(m) is nn.Dropout else (*x.shape[:2], *[1] * (x.ndim - 2))
        rows = b["rows"]
        if x.ndim >= 2 and x.shape[0] == rows.stop - rows.start:
            u = torch.rand((b["n"], *shape[1:]), generator=self._generator(b, "key", x.device), device=x.device)[rows]
        else:
            u = torch.rand(shape, generator=self._generator(b, "fallback_key", x.device), device=x.device)
        return x * (u >= m.p).to(x.dtype) / (1 - m.p)

    @staticmethod
    def _generator(b: dict, which: str, device) -> torch.Generator:
        gens = b["gens"]
        if (which, device) not in gens:
            gens[which, device] = torch.Generator(device=device).manual_seed(b[which])
        return gens[which, device]


class EMA:
    """Exponential moving average of parameters, in float32, identical on every process (same updates).

    The decay at step s is min(decay, (1 + s) / (warmup + s)) (train.ema_decay, train.ema_warmup): early averages
    are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Warm-up of the decay so that early averages are not dominated by the random initialisation.
        d = min(self.decay, (1 + step) / (self.warmup + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def to(self, device) -> EMA:
        """Keep the averages on the model's device (the update reads the live weights there)."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        check_weights_fit(self.shadow, state, "EMA weights")
        for k, v in state.items():
            self.shadow[k].copy_(v)


def lr_lambda(cfg) -> callable:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def check_weights_fit(own: dict[str, Tensor], state: dict[str, Tensor], where: str) -> None:
    """Raise CheckpointError naming the first key or shape in `state` that does not fit the tensors `own`."""
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not fit this model (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{where}: weight {k!r} has shape {tuple(v.shape)}, the model needs "
                                  f"{tuple(own[k].shape)} (was the checkpoint trained with another model config?)")


def _load_weights(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    check_weights_fit(model.state_dict(), state, where)
    model.load_state_dict(state)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest valid checkpoint of a run folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"no checkpoint or run folder at {path}")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"run folder {path} holds no valid checkpoint")
    return found


# --- processes and output folders ----------------------------------------------------------------------
def launch_kwargs() -> dict:
    """Keyword arguments for accelerate's Accelerator / PartialState in this launch: cpu=True when several processes
    were started (torchrun or `accelerate launch` set WORLD_SIZE) on a machine without a GPU-like device, or when
    ACCELERATE_USE_CPU is set. accelerate joins CPU processes into one gloo group only when told cpu=True; without
    it each of them runs alone, as one process."""
    parse_flag_from_env = require("accelerate.utils", "sdekit train and sdekit sample").parse_flag_from_env

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return {"cpu": parse_flag_from_env("ACCELERATE_USE_CPU") or (several and (device is None or device.type == "mps"))}


def check_launch(num_processes: int) -> None:
    """Refuse to run when the launcher started WORLD_SIZE processes but they did not join one group of that size:
    they would each do all the work and write the same files."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise ConfigError(f"the launcher started {launched} processes (WORLD_SIZE) but accelerate set up "
                          f"{num_processes}; on CPU launch with ACCELERATE_USE_CPU=1, or check the distributed backend")


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, is_main: bool, num_processes: int, device=None, check=None):
    """The main process holds `folder`'s lock (checkpoint.folder_lock) while the block runs; every process raises
    FolderInUseError when it is taken, so that no process waits for a peer that stopped. Call on every process.

    check: called by the main process once it holds the lock (e.g. `check_run_folder`); the ConfigError or
    CheckpointError it raises stops every process before the block runs."""
    with contextlib.ExitStack() as stack:
        error = None
        if is_main:
            try:
                stack.enter_context(folder_lock(folder))
                if check is not None:
                    check()
            except (ConfigError, CheckpointError) as e:
                error = e
        if num_processes > 1:
            import torch.distributed as dist
            failed = torch.tensor([float(error is not None)], device=device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if error is None and failed.item() > 0:
                error = FolderInUseError(f"output folder {folder}: the main process refused to start the run "
                                         "(its error names the reason)")
        if error is not None:
            raise error
        yield


# What a run writes into its folder (train.out_dir), and the config keys a resumed run may change: how long it
# runs and what it writes, not the trajectory of the steps both runs take.
RUN_FILES = ("checkpoints", "log.jsonl", "config.json", "loss.png", "samples", "eval_cache")
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
                     "train.max_bad_steps", "train.num_threads", "train.out_dir", "sample")


def _run_files(run_dir: Path) -> list[str]:
    """The files of a previous run in run_dir (an empty checkpoints/ folder is none)."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if "checkpoints" in found and not any((run_dir / "checkpoints").iterdir()):
        found.remove("checkpoints")
    return found


def _config_differences(saved: dict, cfg: Config) -> list[str]:
    """Dotted keys whose values differ between a saved config and cfg, outside RESUME_MAY_CHANGE."""
    def flat(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k != "options":
                yield from flat(v, key + ".")
            else:
                yield key, v
    old, new = dict(flat(to_dict(from_dict(saved)))), dict(flat(to_dict(cfg)))
    free = lambda key: any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)  # noqa: E731
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if not free(k) and old.get(k) != new.get(k)]


def check_run_folder(cfg: Config, resume: str | Path | None = None, overwrite: bool = False) -> None:
    """One run per folder, and nothing of an earlier run mixed in or lost without being asked.

    train.out_dir holding an earlier run (checkpoints, log.jsonl, config.json, ...) is refused unless the run is
    resumed (`resume`: that folder, or one of its checkpoints, the newest; same config but for RESUME_MAY_CHANGE)
    or `overwrite` is given, which removes the earlier run's files. A resumed checkpoint from elsewhere starts a
    fresh folder. Raises ConfigError (or CheckpointError for a resume that does not load) naming the way out.
    """
    run_dir = Path(cfg.train.out_dir)
    if resume is not None and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir and --overwrite replaces it: give one of them")
    found = _run_files(run_dir) if run_dir.is_dir() else []
    if resume is None:
        if found and not overwrite:
            ckpts = list_checkpoints(run_dir)
            what = f"checkpoints up to {ckpts[-1].name}" if ckpts else ", ".join(found)
            raise ConfigError(f"output folder {run_dir} already holds a run ({what}); a second run there would mix "
                              f"with it. Train into another folder with train.out_dir=..., continue that run with "
                              f"--resume {run_dir} (same config), or replace it with --overwrite")
        for name in found:   # overwrite: the earlier run goes as a whole
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    ckpt = resolve_checkpoint(resume)
    _, state = load_checkpoint(ckpt, [])
    diff = _config_differences(state["config"], cfg)
    if diff:
        raise ConfigError(f"--resume {resume}: the config differs from the checkpoint's in {'; '.join(diff)}. A "
                          f"resumed run continues the same training (only {', '.join(RESUME_MAY_CHANGE)} may change); "
                          f"start a new run with train.out_dir=... instead")
    if found:
        ours = list_checkpoints(run_dir)
        if ckpt.resolve().parent != (run_dir / "checkpoints").resolve():
            raise ConfigError(f"--resume {resume} is not a checkpoint of {run_dir}, which holds another run: resume "
                              f"into a new folder (train.out_dir=...), or resume {run_dir} itself")
        newer = [p.name for p in ours if p.name > ckpt.name]
        if newer:
            raise ConfigError(f"--resume {ckpt} is older than {run_dir}'s newest checkpoints ({', '.join(newer)}), "
                              f"which the resumed run would mix with: resume {run_dir} (its newest), or resume into "
                              f"a new folder with train.out_dir=...")


# --- the loop ---------------------------------------------------------------------------------------
def train(cfg: Config, resume: str | Path | None = None, accelerator=None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Train per `cfg`. Multi-process under `accelerate launch` or torchrun (on CPU too: gloo). The output folder
    train.out_dir is locked for the run: a second run into it raises FolderInUseError naming it. A folder that
    holds an earlier run must be resumed (`resume`, same config) or replaced (`overwrite`); see check_run_folder.
    A run refused before it starts leaves no folder behind that it created.

    Returns {'run_dir', 'step', 'checkpoint' (final, or None on non-main processes), 'loss' (last logged),
    'log' (the log.jsonl of the run: step, loss, lr), 'is_main_process', 'model' (this process's trained network),
    'ema' (EMA weights as a state dict)}.
    """
    Accelerator = require("accelerate", "sdekit train").Accelerator

    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if accelerator is None:
        accelerator = Accelerator(mixed_precision=tc.mixed_precision, **launch_kwargs())
        check_launch(accelerator.num_processes)
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    run_dir = Path(tc.out_dir)
    created = not run_dir.exists()
    check = functools.partial(check_run_folder, cfg, resume, overwrite)
    # One run per output folder; the loop seeds the global RNG per step, and the caller's state comes back after.
    try:
        with exclusive_folder(run_dir, accelerator.is_main_process, accelerator.num_processes, accelerator.device,
                              check), torch.random.fork_rng(devices=cuda):
            return _train(cfg, resume, accelerator, progress)
    except BaseException:
        if created and accelerator.is_main_process and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()   # refused before it wrote anything: leave no empty folder behind
        raise


def _train(cfg: Config, resume, accelerator, progress: bool) -> dict:
    from tqdm.auto import tqdm

    tc = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    if tc.batch_size % (world * tc.grad_accum):
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by processes x train.grad_accum = "
                          f"{world} x {tc.grad_accum}")
    micro = tc.batch_size // (world * tc.grad_accum)
    run_dir = Path(tc.out_dir)

    try:
        data, labels, data_info = load_training_data(cfg.data)
        bin_width = image_bin_width(data_info.get("n_levels")) if cfg.data.dequantize else 0.0
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    data_shape = tuple(data.shape[1:])
    torch.manual_seed(tc.seed)  # network initialisation: identical on every process
    denoiser = build_denoiser(cfg, data_shape)
    check_model_fits_data(denoiser, data[:2], cfg.model.target)
    net = denoiser.net
    num_classes = getattr(net, "num_classes", None)  # class-conditional nets take labels=, with null class num_classes
    if num_classes is not None:
        if labels is None:
            raise ConfigError(f"the model is class-conditional (num_classes={num_classes}) but data "
                              f"{cfg.data.name!r} has no labels")
        if int(labels.max()) >= num_classes:
            raise ConfigError(f"data {cfg.data.name!r} has labels up to {int(labels.max())}; model "
                              f"num_classes={num_classes} is too small")
    optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    ema = EMA(net, tc.ema_decay, tc.ema_warmup)
    start = 0
    if resume is not None:
        ckpt = resolve_checkpoint(resume)
        groups, state = load_checkpoint(ckpt)
        _load_weights(net, groups["model"], str(ckpt))
        ema.load_state_dict(groups["ema"])
        optimizer.load_state_dict(optimizer_from_tensors(groups["optimizer"], state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
        if accelerator.is_main_process:
            print(f"resumed from {ckpt} at step {start}")
            _truncate_log(run_dir / "log.jsonl", start)
    # Only the raw network is wrapped (DDP needs its forward called); the scheduler is stepped by hand so that
    # its schedule does not depend on the number of processes.
    net, optimizer = accelerator.prepare(net, optimizer)
    denoiser.net = net
    device = accelerator.device
    ema.to(device)
    data = data.to(device)
    labels = labels.to(device) if labels is not None else None
    sde = denoiser.sde

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(to_dict(cfg), indent=1))
    log_path = run_dir / "log.jsonl"
    bad_streak, last_loss, ckpt_path = 0, float("nan"), None

    def save(step: int) -> Path | None:
        path = None
        if accelerator.is_main_process:
            opt_tensors, opt_meta = optimizer_to_tensors(optimizer.state_dict())
            raw = accelerator.unwrap_model(net)
            groups = {"model": raw.state_dict(), "ema": ema.state_dict(), "optimizer": opt_tensors}
            meta = {"config": to_dict(cfg), "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                    "data_shape": list(data_shape), "world_size": world,
                    "rng": f"keyed by (train.seed={tc.seed}, step): data order, times, noise, dropout; "
                           "no global RNG state is carried"}
            path = save_checkpoint(run_dir, step, groups, meta)
            prune_checkpoints(run_dir, tc.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    dropout = KeyedDropout(net)
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc="train", dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    for step in bar:
        gen = step_generator(tc.seed, step)
        idx = batch_indices(data.shape[0], tc.batch_size, step, cfg.data.seed + tc.seed)
        t_all = sample_t(sde, tc.batch_size, gen, cfg.loss.t_sampling, cfg.loss.P_mean, cfg.loss.P_std,
                         dtype=data.dtype)
        noise_all = torch.randn((tc.batch_size, *data_shape), generator=gen, dtype=data.dtype)
        # Augmentation and label dropout draw after (t, noise), only when enabled: runs without them keep their draws.
        flip_all = torch.rand(tc.batch_size, generator=gen) < 0.5 if cfg.data.hflip else None
        u_all = (torch.rand((tc.batch_size, *data_shape), generator=gen, dtype=data.dtype) - 0.5
                 if cfg.data.dequantize else None)
        drop_all = (torch.rand(tc.batch_size, generator=gen) < cfg.model.label_dropout
                    if num_classes is not None else None)
        total = torch.zeros((), device=device)
        net.train()
        for k in range(tc.grad_accum):
            part = slice((k * world + rank) * micro, (k * world + rank + 1) * micro)
            x0, t, noise = data[idx[part].to(device)], t_all[part].to(device), noise_all[part].to(device)
            if flip_all is not None:
                x0 = torch.where(flip_all[part].to(device).reshape(-1, *[1] * len(data_shape)), x0.flip(-1), x0)
            if u_all is not None:
                x0 = x0 + bin_width * u_all[part].to(device)
            net_kwargs = {}
            if num_classes is not None:
                y = labels[idx[part].to(device)]
                net_kwargs["labels"] = torch.where(drop_all[part].to(device), torch.full_like(y, num_classes), y)
            sync = accelerator.no_sync(net) if k < tc.grad_accum - 1 else contextlib.nullcontext()
            key = derive_seed(tc.seed, "network_rng", step, k, rank)
            # any other random op in the network: keyed too (the caller's RNG is restored by train)
            torch.manual_seed(key)
            with sync, accelerator.autocast(), dropout.micro_batch(tc.seed, step, part, tc.batch_size, key):
                loss = dsm_loss(denoiser, x0, t, noise, cfg.loss.weighting, cfg.loss.min_snr_gamma,
                                **net_kwargs).mean() / tc.grad_accum
            accelerator.backward(loss)
            total += loss.detach().float()
        lr_used = optimizer.param_groups[0]["lr"]   # this step's learning rate (the scheduler moves on below)
        grad_norm = accelerator.clip_grad_norm_(net.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        # Every process must agree whether to step, or the replicas diverge.
        norm = torch.as_tensor(grad_norm, device=device).float()
        finite = accelerator.gather(torch.stack([total, norm]).reshape(1, 2))
        if bool(torch.isfinite(finite).all()):
            optimizer.step()
            bad_streak = 0
        else:
            bad_streak += 1
            warnings.warn(f"step {step}: non-finite loss or gradient, step skipped ({bad_streak} in a row)",
                          stacklevel=2)
            if bad_streak >= tc.max_bad_steps:
                optimizer.zero_grad(set_to_none=True)
                last = latest_checkpoint(run_dir)
                raise FloatingPointError(f"{bad_streak} consecutive non-finite losses at step {step}; stopping. "
                                         f"Last good checkpoint: {last}. Lower train.lr or check the data.")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ema.update(accelerator.unwrap_model(net), step)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            last_loss = float(finite[:, 0].mean())
            if accelerator.is_main_process:
                bar.set_postfix(loss=f"{last_loss:.4f}")
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": done, "loss": last_loss, "lr": lr_used}) + "\n")
        if done % tc.ckpt_every == 0 or done == tc.steps:
            ckpt_path = save(done)
    bar.close()
    dropout.remove()
    return {"run_dir": str(run_dir), "step": tc.steps, "checkpoint": str(ckpt_path) if ckpt_path else None,
            "loss": last_loss, "log": str(log_path), "is_main_process": accelerator.is_main_process,
            "model": accelerator.unwrap_model(net), "ema": ema.state_dict()}


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop the log rows after `step` (written by the run before it was killed), which the resumed run logs again."""
    if log_path.is_file():
        rows = [line for line in log_path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
        if len(kept) != len(rows):
            atomic_write_text(log_path, "".join(line + "\n" for line in kept))


def load_trained(path: str | Path, use_ema: bool = True, device="cpu") -> tuple[Denoiser, Config, Path]:
    """A trained denoiser (score_fn) from a checkpoint or run folder, with its config and checkpoint path."""
    ckpt = resolve_checkpoint(path)
    groups, state = load_checkpoint(ckpt, ["ema" if use_ema else "model"])
    cfg = from_dict(state["config"])
    denoiser = build_denoiser(cfg, tuple(state["data_shape"]))
    _load_weights(denoiser.net, groups["ema" if use_ema else "model"], str(ckpt))
    return denoiser.to(device).eval(), cfg, ckpt
