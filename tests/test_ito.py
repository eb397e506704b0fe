"""Ito demonstrations against closed forms, in standard errors; the naive chain rule must fail the same checks."""

import numpy as np
import pytest
import torch

from sdekit import ito

Z = 4.0  # tolerance in standard errors



def gen(seed):
    return torch.Generator().manual_seed(seed)


def slope(x, y):
    return np.polyfit(np.log(x), np.log(y), 1)[0]


def test_w_squared_is_T_not_zero():
    r = ito.w_squared(T=2.0, n_paths=40_000, n_steps=50, generator=gen(0))
    assert abs(r.z_theory) < Z
    assert abs(r.z_naive) > 10 * Z
    e = r.extra
    assert e["max_identity_error"] < 1e-10          # W_T^2 = sum 2 W dW + sum dW^2, path by path
    assert abs(e["mean_2_int_W_dW"]) < Z * e["se_2_int_W_dW"]
    assert abs(e["mean_quadratic_variation"] - 2.0) < Z * e["se_quadratic_variation"]


def test_riemann_sums_converge_to_different_limits():
    r = ito.riemann_sums(T=1.0, n_paths=8_000, steps=(4, 32, 256), generator=gen(1))
    for ms, se, th in zip(r.ms_left_ito, r.se_left_ito, r.theory_ms_left_ito()):
        assert abs(ms - th) < Z * se
    for ms, se, th in zip(r.ms_mid_strat, r.se_mid_strat, r.theory_ms_mid_strat()):
        assert abs(ms - th) < Z * se
    assert slope(r.steps, r.ms_left_ito) == pytest.approx(-1.0, abs=0.1)
    # the wrong pairings do not converge: they stay near (T/2)^2
    assert min(r.ms_left_strat) > 0.2 and min(r.ms_mid_ito) > 0.2
    lm = r.left_minus_strat
    assert abs(lm.z_theory) < Z and abs(lm.z_naive) > 10 * Z
    assert abs(r.mid_minus_strat.z_theory) < Z


def test_gbm_log_mean_has_the_ito_drift():
    r = ito.gbm_log_mean(x0=2.0, mu=0.3, sigma=0.6, T=1.0, n_paths=10_000, n_steps=200, generator=gen(2))
    assert abs(r.z_theory) < Z
    assert abs(r.z_naive) > Z
    # the mean itself follows the naive ODE: the correction comes from the log's curvature
    e = r.extra
    assert abs(e["mean_X_T"] - e["theory_mean_X_T"]) < Z * e["se_X_T"]


def test_derivatives_by_autograd():
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    f, d1, d2 = ito.derivatives(lambda v: v ** 3, x)
    torch.testing.assert_close(d1, 3 * x ** 2)
    torch.testing.assert_close(d2, 6 * x)
    _, _, d2 = ito.derivatives(lambda v: 3 * v + 1, x)
    assert torch.all(d2 == 0)
    with pytest.raises(ValueError, match="elementwise"):
        ito.derivatives(lambda v: v.sum(), x)


@pytest.mark.parametrize("name,x0", [("sin", 1.0), ("exp", 0.5), ("cube", 1.5), ("log1p_sq", -0.5)])
def test_ito_lemma_drift(name, x0):
    f = ito.EXAMPLE_FUNCTIONS[name]
    r = ito.ito_drift(f, lambda x: -x, lambda x: 0.5 + 0.3 * torch.sin(x), x0, n_paths=40_000, generator=gen(3))
    assert abs(r.z_theory) < Z
    assert abs(r.z_naive) > Z                         # without (1/2) g^2 f'' the drift is rejected


def test_gbm_ito_stratonovich_conversion():
    c = ito.gbm_ito_stratonovich(x0=1.0, mu=0.5, sigma=0.8, steps=(16, 64, 256), n_paths=6_000, generator=gen(4))
    # uncorrected: the schemes disagree on average by the Ito-Stratonovich gap, not by 0
    assert abs(c.mean_diff.z_theory) < Z and abs(c.mean_diff.z_naive) > Z
    assert abs(c.mean_diff_corrected.z_theory) < Z
    # each scheme converges strongly to its own exact solution ...
    assert slope(c.steps, c.rms_em_exact) < -0.3
    assert slope(c.steps, c.rms_heun_exact_strat) < -0.7
    # ... so the uncorrected gap stays put while the corrected pair converges at EM's strong order 1/2
    assert c.rms_em_heun[-1] > 0.8 * c.rms_em_heun[0]
    assert slope(c.steps, c.rms_em_heun_corrected) == pytest.approx(-0.5, abs=0.15)
    assert c.rms_em_heun[-1] > 10 * c.rms_em_heun_corrected[-1]


def test_conversion_nonlinear_diffusion_and_additive_noise():
    g = lambda x: 0.5 + 0.3 * torch.sin(x) + 0.2 * x  # noqa: E731
    c = ito.ito_stratonovich(lambda x: -x, g, 0.5, steps=(8, 32, 128), n_paths=3_000, generator=gen(5))
    assert slope(c.steps, c.rms_em_heun_corrected) < -0.35
    assert c.rms_em_heun[-1] > 5 * c.rms_em_heun_corrected[-1]
    # additive noise: g' = 0, the calculi agree and the correction is exactly zero
    a = ito.ito_stratonovich(lambda x: -x, lambda x: 0.5 + 0 * x, 0.5, steps=(8, 32), n_paths=1_000, generator=gen(6))
    assert a.rms_em_heun == a.rms_em_heun_corrected
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(ito.stratonovich_drift(lambda v: -v, g)(x), -x - 0.5 * g(x) * (0.3 * torch.cos(x) + 0.2))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="divisor"):
        ito.ito_stratonovich(lambda x: x, lambda x: x, 1.0, steps=(3, 8))
    with pytest.raises(ValueError, match="n_paths"):
        ito.w_squared(n_paths=0)
    with pytest.raises(ValueError, match="unknown f"):
        ito.run_all(f_name="nope")


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    from sdekit.commands.ito import main
    assert main(["--out", str(tmp_path), "--scale", "0.02"]) == 0
    assert "E[W_T^2]" in capsys.readouterr().out
    import json
    data = json.loads((tmp_path / "ito.json").read_text())
    assert data["w_squared"]["theory"] == 1.0
    assert (tmp_path / "ito.png").stat().st_size > 10_000
