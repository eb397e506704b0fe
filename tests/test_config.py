"""Config parsing: YAML, overrides, and errors that name the bad key or value."""
import dataclasses
from pathlib import Path

import pytest

from sdekit.config import ConfigError, load_config
from sdekit.training import build_network, build_sde

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_build(path):
    cfg = load_config(path)
    build_sde(cfg.sde)


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/ring.yaml",
                      ["train.lr=1e-3", "train.steps=7", "sample.denoise=true", "sde.beta_max=10"])
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 7 and cfg.sample.denoise is True and cfg.sde.beta_max == 10.0


@pytest.mark.parametrize("override, message", [
    (["train.lerning_rate=1"], "unknown config key 'train.lerning_rate'"),
    (["trian.steps=1"], "unknown config key 'trian'"),
    (["train.steps=abc"], "train.steps must be an integer"),
    (["train.steps=0"], "train.steps must be > 0"),
    (["train.lr=-1"], "train.lr must be > 0"),
    (["train.ema_decay=1.5"], "train.ema_decay"),
    (["sde.name=vq"], "sde.name = 'vq' is not allowed"),
    (["model.prediction=noise"], "model.prediction"),
    (["sample.steps=0"], "sample.steps must be >= 1"),
    (["sample.denoise=3"], "sample.denoise must be true or false"),
    (["sample.sampler=heum"], "sample.sampler = 'heum' is not allowed; expected one of .'euler_maruyama'"),
    (["sample.grid=log-snr"], "sample.grid = 'log-snr' is not allowed"),
    (["sde.schedule=quadratic"], "sde.schedule = 'quadratic' is not allowed; expected one of .'linear', 'cosine'."),
    (["train.ema_warmup=0"], "train.ema_warmup must be >= 1"),
    (["train.lr_floor=1.5"], "train.lr_floor must be in .0, 1., got"),
    (["train.lr_floor=nan"], "train.lr_floor must be in .0, 1., got"),
    (["train.steps"], "must look like section.key=value"),
])
def test_errors_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(ROOT / "configs/ring.yaml", override)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_sde_and_model_options_are_checked():
    with pytest.raises(ConfigError, match="sde.sigma_max does not apply"):   # refused when the config loads
        load_config(ROOT / "configs/ring.yaml", ["sde.sigma_max=3"])
    # and by build_sde, for a config built by hand
    with pytest.raises(ConfigError, match="sde.sigma_max does not apply"):
        build_sde(dataclasses.replace(load_config(ROOT / "configs/ring.yaml").sde, sigma_max=3.0))
    cfg = load_config(ROOT / "configs/ring.yaml", ["model.options.widht=3"])
    with pytest.raises(ConfigError, match="model.options.widht"):
        build_network(cfg.model, (2,))
    cfg = load_config(ROOT / "configs/ring.yaml", ["model.target=sdekit_models.nothere:Net"])
    with pytest.raises(ConfigError, match="cannot be imported"):
        build_network(cfg.model, (2,))


def test_edm_sigma_data_is_one_value_in_the_resolved_config():
    """The shipped EDM config's sigma_data (0.75) reaches the model section, the SDE and the denoiser; with none
    given, both sections resolve to EDM's default 0.5 (the preconditioning used 1.0 for prediction types other
    than 'edm'); non-EDM configs keep model.sigma_data = 1.0; contradicting values are an error naming both keys."""
    from sdekit.config import from_dict, to_dict
    from sdekit.training import build_denoiser

    cfg = load_config(ROOT / "configs/digits_edm.yaml", ["model.options.num_classes=null"])
    assert cfg.sde.sigma_data == cfg.model.sigma_data == 0.75
    den = build_denoiser(cfg, (1, 8, 8), net=lambda x, c: x)
    assert den.sigma_data == den.sde.sigma_data == 0.75
    for prediction in ("eps", "edm"):
        cfg = from_dict({"sde": {"name": "edm"}, "model": {"prediction": prediction}})
        assert cfg.sde.sigma_data == cfg.model.sigma_data == 0.5
        den = build_denoiser(cfg, (2,), net=lambda x, c: x)
        assert den.sigma_data == den.sde.sigma_data == 0.5
        assert from_dict(to_dict(cfg)).model.sigma_data == 0.5          # the saved config reloads to the same values
    cfg = from_dict({"sde": {"name": "edm"}, "model": {"sigma_data": 0.6}})
    assert cfg.sde.sigma_data == cfg.model.sigma_data == 0.6
    cfg = from_dict({"sde": {"name": "vp"}})
    assert cfg.model.sigma_data == 1.0 and cfg.sde.sigma_data is None
    with pytest.raises(ConfigError, match=r"model.sigma_data = 1.0 .*sde.sigma_data = 0.75"):
        load_config(ROOT / "configs/digits_edm.yaml", ["model.sigma_data=1.0"])
    with pytest.raises(ConfigError, match=r"sde.sigma_data must be > 0"):
        from_dict({"sde": {"name": "edm", "sigma_data": -1.0}})


def test_choices_are_the_registries():
    """Every choice key accepts exactly its registry's names: SDEs, prediction types, weightings, time samplings,
    samplers (one registered by a user included) and grids."""
    import sdekit
    from sdekit.config import from_dict
    from sdekit.losses import T_SAMPLINGS, WEIGHTINGS
    from sdekit.precond import PREDICTIONS
    from sdekit.samplers.grids import GRIDS

    registries = {("sde", "name"): sdekit.sde.SDES, ("model", "prediction"): PREDICTIONS,
                  ("loss", "weighting"): WEIGHTINGS, ("loss", "t_sampling"): T_SAMPLINGS,
                  ("sample", "sampler"): sdekit.SAMPLERS, ("sample", "grid"): GRIDS}
    for (section, key), names in registries.items():
        for name in names:
            cfg = from_dict({section: {key: name}})
            assert getattr(getattr(cfg, section), key) == name
    sdekit.SAMPLERS["mine"] = sdekit.SAMPLERS["heun"]
    try:
        assert from_dict({"sample": {"sampler": "mine"}}).sample.sampler == "mine"
    finally:
        del sdekit.SAMPLERS["mine"]
    with pytest.raises(ConfigError, match="sample.sampler = 'mine'"):
        from_dict({"sample": {"sampler": "mine"}})
    assert from_dict({"sample": {"grid": "optimized"}}).sample.grid == "optimized"   # sample()'s fitted grid


def test_lr_floor_and_ema_warmup_drive_the_schedules():
    """train.lr_floor is where the cosine schedule ends (defaults: 0.1 and an EMA warm-up of 10 steps); with
    train.ema_warmup=1 the EMA uses its decay from the first step."""
    import torch

    from sdekit.training import EMA, lr_lambda

    cfg = load_config(ROOT / "configs/ring.yaml")
    assert (cfg.train.lr_floor, cfg.train.ema_warmup) == (0.1, 10)
    for floor in (0.0, 0.1, 0.3):
        tc = load_config(ROOT / "configs/ring.yaml", [f"train.lr_floor={floor}"]).train
        factor = lr_lambda(tc)
        assert factor(tc.warmup_steps) == pytest.approx(1.0) and factor(tc.steps) == pytest.approx(floor)
    net = torch.nn.Linear(1, 1, bias=False)
    for warmup, first_decay in ((10, 0.1), (1, 0.9)):
        with torch.no_grad():
            net.weight.fill_(0.0)
        ema = EMA(net, 0.9, warmup)
        with torch.no_grad():
            net.weight.fill_(1.0)
        ema.update(net, step=0)          # decay min(0.9, 1 / warmup): shadow = (1 - decay) * 1
        assert ema.shadow["weight"].item() == pytest.approx(1 - first_decay)


def test_switching_the_sde_by_name_drops_the_other_sdes_settings():
    """ring.yaml sets the VP SDE's beta_min/beta_max: `sde.name=ve` on the command line replaces that SDE, so its
    settings go with it, and the VE SDE gets its own defaults beside the overrides given."""
    from sdekit.sde import VESDE

    cfg = load_config(ROOT / "configs/ring.yaml", ["train.steps=5000", "sde.name=ve", "sde.sigma_max=10"])
    assert (cfg.sde.name, cfg.sde.sigma_max, cfg.sde.beta_min, cfg.sde.beta_max) == ("ve", 10.0, None, None)
    sde = build_sde(cfg.sde)
    assert isinstance(sde, VESDE) and sde.sigma_max == 10.0 and sde.sigma_min == VESDE().sigma_min
    # the same name as the file's keeps the file's settings; a setting given on the command line that does not
    # apply to the new SDE is still refused, by name
    assert load_config(ROOT / "configs/ring.yaml", ["sde.name=vp"]).sde.beta_max == 20.0
    with pytest.raises(ConfigError, match=r"sde.beta_min does not apply to sde.name='ve'.*sde.beta_min=null"):
        load_config(ROOT / "configs/ring.yaml", ["sde.name=ve", "sde.beta_min=0.1"])


def test_a_config_file_given_as_an_override_suggests_config():
    with pytest.raises(ConfigError, match="--config configs/ring.yaml"):
        load_config(None, ["configs/ring.yaml"])
