"""Typed experiment configs: dataclasses, filled from YAML and `section.key=value` overrides.

Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the dotted key,
before any work starts. The resolved config is saved (as JSON) in every checkpoint and output folder.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .losses import T_SAMPLINGS, WEIGHTINGS
from .precond import PREDICTIONS
from .samplers import SAMPLERS
from .samplers.grids import GRIDS
from .sde import SDES, VP_SCHEDULES

__all__ = ["ConfigError", "SDEConfig", "DataConfig", "ModelConfig", "LossConfig", "TrainConfig", "SampleConfig",
           "Config", "load_config", "from_dict", "to_dict", "apply_overrides"]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and what was expected."""


@dataclass
class SDEConfig:
    name: str = "vp"                     # a key of sdekit.sde.SDES: vp | subvp | ve | edm
    beta_min: float | None = None        # vp, subvp
    beta_max: float | None = None
    schedule: str | None = None          # vp: linear | cosine
    sigma_min: float | None = None       # ve, edm
    sigma_max: float | None = None
    rho: float | None = None             # edm
    sigma_data: float | None = None      # edm (the one data scale: model.sigma_data must agree or be left out)
    t_min: float | None = None
    t_max: float | None = None


@dataclass
class DataConfig:
    name: str = "ring"                   # a toy set (sdekit.data.TOY_DATASETS) or another registered source
    n_train: int = 20000                 # toy sets: size of the fixed training set drawn with `seed`
    seed: int = 0
    path: str | None = None              # file-based sources
    test_fraction: float = 0.2           # image sets: held-out share, split by a permutation seeded with `seed`
    hflip: bool = False                  # image sets: random horizontal flips (off for digits: a flipped 3 is no digit)
    dequantize: bool = False             # image sets: add uniform noise of one quantisation bin (for bits/dim)
    layout: str | None = None            # npz: NCHW | NHWC, needed when a 4-D array's shape allows both
    value_range: list[float] | None = None   # npz: [lo, hi] stored values mapped to [-1, 1]; for non-uint8 integers
    options: dict = field(default_factory=dict)   # the loader's options (npz: x_key, y_key; image_folder: channels)


@dataclass
class ModelConfig:
    target: str = "sdekit_models.mlp:MLP"   # `module:Class`, built as Class(dim, **options)
    prediction: str = "eps"              # sdekit.precond.PREDICTIONS: eps | x0 | v | score | edm
    sigma_data: float | None = None      # null: sde.sigma_data under EDM (0.5 unless set), else 1 (resolve_sigma_data)
    label_dropout: float = 0.1           # class-conditional nets: share of labels replaced by the null class
    options: dict = field(default_factory=dict)


@dataclass
class LossConfig:
    weighting: str = "uniform"           # sdekit.losses.WEIGHTINGS: uniform | likelihood | snr | min_snr | edm
    t_sampling: str = "uniform"          # sdekit.losses.T_SAMPLINGS: uniform | lognormal
    P_mean: float = -1.2
    P_std: float = 1.2
    min_snr_gamma: float = 5.0


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 512                # global batch per optimiser step (all processes, all accumulation steps)
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"          # constant | cosine (after warmup)
    lr_floor: float = 0.1                # cosine: the learning rate decays from lr to lr_floor * lr
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: int = 10                 # the EMA decay at step s is min(ema_decay, (1 + s) / (ema_warmup + s))
    seed: int = 0
    mixed_precision: str = "no"          # no | bf16 | fp16
    log_every: int = 100
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    max_bad_steps: int = 10              # consecutive non-finite losses before the run stops
    out_dir: str = "runs/default"
    num_threads: int = 0                 # CPU threads for torch in training and sampling; 0 keeps torch's default


@dataclass
class SampleConfig:
    sampler: str = "heun"                # a key of sdekit.SAMPLERS
    steps: int | None = None
    grid: str | None = None              # a key of sdekit.samplers.grids.GRIDS, or optimized; null: the sampler's own
    n_samples: int = 4000
    batch_size: int = 4000
    seed: int = 1
    denoise: bool = False
    use_ema: bool = True
    guidance: float | None = None        # classifier-free guidance scale (class-conditional nets; null means 1)
    options: dict = field(default_factory=dict)


@dataclass
class Config:
    name: str = "default"
    sde: SDEConfig = field(default_factory=SDEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        validate(self)


MIXED_PRECISION = ("no", "bf16", "fp16")     # accelerate's settings
LR_SCHEDULES = ("constant", "cosine")


def _choices() -> dict[str, tuple]:
    """The allowed values of each choice key, read from the registries that define them when a config is validated
    (a sampler registered in SAMPLERS by a user is a valid sample.sampler)."""
    return {
        "sde.name": tuple(SDES),
        "sde.schedule": (None, *VP_SCHEDULES),
        "model.prediction": tuple(PREDICTIONS),
        "loss.weighting": tuple(WEIGHTINGS),
        "loss.t_sampling": tuple(T_SAMPLINGS),
        "train.mixed_precision": MIXED_PRECISION,
        "train.lr_schedule": LR_SCHEDULES,
        "sample.sampler": tuple(SAMPLERS),
        "sample.grid": (None, *GRIDS, "optimized"),
    }


_POSITIVE = ["train.steps", "train.batch_size", "train.grad_accum", "train.lr", "train.log_every", "train.ckpt_every",
             "train.keep_checkpoints", "train.max_bad_steps", "data.n_train", "sample.n_samples",
             "sample.batch_size", "loss.P_std", "loss.min_snr_gamma"]
_NON_NEGATIVE = ["train.weight_decay", "train.warmup_steps", "train.grad_clip", "train.num_threads"]


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def sde_parameters(name: str) -> set[str]:
    """The sde.* keys that apply to the SDE registered as `name` (its constructor's parameters)."""
    return set(inspect.signature(SDES[name]).parameters)


def _check_sde_keys(sde: SDEConfig) -> None:
    accepted = sde_parameters(sde.name)
    for f in dataclasses.fields(SDEConfig):
        if f.name != "name" and getattr(sde, f.name) is not None and f.name not in accepted:
            raise ConfigError(f"sde.{f.name} does not apply to sde.name={sde.name!r}; it takes {sorted(accepted)} "
                              f"(leave sde.{f.name} out, or set sde.{f.name}=null)")


def resolve_sigma_data(cfg: Config) -> None:
    """Make sde.sigma_data and model.sigma_data one value, in place.

    EDM carries the data scale (its default 0.5), and the preconditioning and the loss weighting read it from
    the SDE: under sde.name=edm a value given in either section fills the other, none gives EDM's default, and
    two different values are an error. Other SDEs have no data scale: model.sigma_data (default 1.0) is used.
    """
    for key in ("sde.sigma_data", "model.sigma_data"):
        v = _get(cfg, key)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{key} must be > 0, got {v!r}")
    sde_value, model_value = cfg.sde.sigma_data, cfg.model.sigma_data
    if cfg.sde.name != "edm":
        cfg.model.sigma_data = 1.0 if model_value is None else model_value
        return
    if sde_value is not None and model_value is not None and sde_value != model_value:
        raise ConfigError(f"model.sigma_data = {model_value!r} contradicts sde.sigma_data = {sde_value!r}; EDM's data "
                          f"scale is one value used by the preconditioning and the loss: give it once (sde.sigma_data) "
                          f"or equal in both")
    if sde_value is None and model_value is None:
        import inspect

        from .sde import EDM
        sde_value = inspect.signature(EDM).parameters["sigma_data"].default
    cfg.sde.sigma_data = cfg.model.sigma_data = float(sde_value if sde_value is not None else model_value)


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express; resolves sigma_data (see resolve_sigma_data)."""
    for key, choices in _choices().items():
        if _get(cfg, key) not in choices:
            allowed = [c for c in choices if c is not None]
            raise ConfigError(f"{key} = {_get(cfg, key)!r} is not allowed; expected one of {allowed}")
    for key in _POSITIVE:
        v = _get(cfg, key)
        if not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{key} must be > 0, got {v!r}")
    for key in _NON_NEGATIVE:
        v = _get(cfg, key)
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{key} must be >= 0, got {v!r}")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {cfg.train.ema_decay!r}")
    if not cfg.train.ema_warmup >= 1:
        raise ConfigError(f"train.ema_warmup must be >= 1 (1: no warm-up), got {cfg.train.ema_warmup!r}")
    if not 0 <= cfg.train.lr_floor <= 1:
        raise ConfigError(f"train.lr_floor must be in [0, 1], got {cfg.train.lr_floor!r}")
    if cfg.sample.steps is not None and cfg.sample.steps < 1:
        raise ConfigError(f"sample.steps must be >= 1 (or null for the sampler's default), got {cfg.sample.steps!r}")
    for key in ("data.test_fraction", "model.label_dropout"):
        if not 0 <= _get(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {_get(cfg, key)!r}")
    if ":" not in cfg.model.target:
        raise ConfigError(f"model.target must look like 'module:Class', got {cfg.model.target!r}")
    _check_sde_keys(cfg.sde)
    _validate_image_data(cfg.data)
    resolve_sigma_data(cfg)


def _validate_image_data(d: DataConfig) -> None:
    """data.layout, data.value_range and the loader's data.options for image sources (sdekit.images)."""
    from .images import LAYOUTS, LOADER_OPTIONS

    if d.layout is not None and d.layout not in LAYOUTS:
        raise ConfigError(f"data.layout = {d.layout!r} is not allowed; expected one of {list(LAYOUTS)} (or null)")
    if d.value_range is not None:
        finite = all(math.isfinite(v) for v in d.value_range)
        if len(d.value_range) != 2 or not finite or not d.value_range[1] > d.value_range[0]:
            raise ConfigError(f"data.value_range must be [lo, hi] with finite lo < hi, got {d.value_range!r}")
    if (d.layout is not None or d.value_range is not None) and d.name != "npz":
        key = "data.layout" if d.layout is not None else "data.value_range"
        raise ConfigError(f"{key} applies to data.name='npz' (arrays), not {d.name!r}")
    if d.name in LOADER_OPTIONS:
        unknown = [k for k in d.options if k not in LOADER_OPTIONS[d.name]]
        if unknown:
            hint = f"; use data.{unknown[0]}" if unknown[0] in ("layout", "value_range") else ""
            raise ConfigError(f"unknown data option 'data.options.{unknown[0]}' for data.name={d.name!r}; it takes "
                              f"{list(LOADER_OPTIONS[d.name]) or 'none'}{hint}")


# --- dict <-> dataclass with type checks ------------------------------------------------------------
def _check_value(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} has the wrong type; expected {tp}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key} must be an integer, got {value!r} ({type(value).__name__})")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r} ({type(value).__name__})")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r} ({type(value).__name__})")
        (item,) = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls, data: Any, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f" in section '{prefix}'" if prefix else ""
        dotted = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{dotted}'{where}; known keys: {names}")
    kwargs = {k: _check_value(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    """Build and validate a Config from a nested dict (missing keys take their defaults)."""
    return _build(Config, data or {})


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a nested dict; values are parsed as YAML (so 1e-3, true, null work)."""
    data = json.loads(json.dumps(data or {}))
    for item in overrides:
        if "=" not in item:
            hint = ""
            if item.endswith((".yaml", ".yml")):
                hint = f"; to read a config file, pass it as --config {item}"
            elif Path(item).is_dir():
                hint = f"; to name a run folder, pass it as --run {item}"
            raise ConfigError(f"override {item!r} must look like section.key=value{hint}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def _switch_sde(data: dict, overrides: list[str]) -> dict:
    """When an override names another SDE (`sde.name=ve` over a file's vp), the file's sde.* keys that do not apply
    to the new SDE (beta_min, beta_max, ...) are dropped: they were the other SDE's settings. Keys given as
    overrides are kept, so one that does not apply is still an error naming it."""
    names = [item.split("=", 1)[1] for item in overrides if "=" in item and item.split("=", 1)[0].strip() == "sde.name"]
    sde = data.get("sde")
    if not names or not isinstance(sde, dict):
        return data
    new = yaml.safe_load(names[-1]) if names[-1].strip() else ""
    if new == sde.get("name", SDEConfig.name) or new not in SDES:
        return data   # the same SDE, or a name validation will refuse
    accepted = sde_parameters(new)
    return {**data, "sde": {k: v for k, v in sde.items() if k == "name" or k in accepted}}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when path is None), apply overrides, validate.

    An override `sde.name=...` naming another SDE than the file's drops the file's settings of the other SDE
    (`configs/ring.yaml sde.name=ve sde.sigma_max=10` is a VE SDE with sigma_max 10 and the default sigma_min)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return from_dict(apply_overrides(_switch_sde(data, overrides or []), overrides or []))
