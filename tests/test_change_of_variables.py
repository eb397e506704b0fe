"""The change-of-variables example: a pushed-forward sample's density against the closed form and a histogram."""
import importlib.util
import math
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("change_of_variables",
                                               Path(__file__).parents[1] / "examples" / "change_of_variables.py")
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)


def test_flow_density_equals_closed_form_and_passes_the_histogram_tests():
    res = cov.run(n=20_000, bins=10, seed=1)
    assert res["max_abs_log_density_difference"] < 1e-10 and res["roundtrip_error"] < 1e-10
    assert abs(res["total_probability"] - 1) < 1e-3
    # stated tolerance: p > 0.001 for the correct density (fixed seed) ...
    assert res["chi_square"]["p_value"] > 1e-3 and res["chi_square"]["dof"] > 50
    assert all(k["p_value"] > 1e-3 for k in res["ks"])
    # ... and the same test rejects the density without the Jacobian term outright
    assert res["chi_square_without_jacobian"]["p_value"] < 1e-10
    assert not 0.9 < res["without_jacobian_total"] < 1.1


def test_autograd_log_det_matches_the_analytic_one_for_another_map():
    # an affine map alone: log |det A| is known, so the generic density is the Gaussian N(b, A A^T)
    a = torch.tensor([[1.5, 0.3], [-0.4, 0.7]], dtype=torch.float64)
    b = torch.tensor([0.1, 2.0], dtype=torch.float64)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lp = cov.flow_log_density(x, fwd=lambda z: z @ a.T + b,
                              inv=lambda x: torch.linalg.solve(a, (x - b).unsqueeze(-1)).squeeze(-1))
    ref = torch.distributions.MultivariateNormal(b, covariance_matrix=a @ a.T).log_prob(x)
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    assert abs(torch.linalg.slogdet(a)[1].item() - math.log(abs(1.5 * 0.7 + 0.3 * 0.4))) < 1e-12


def test_cli_writes_json_and_png(tmp_path, capsys):
    assert cov.main(["--n", "2000", "--bins", "6", "--out", str(tmp_path)]) == 0
    assert "chi-square" in capsys.readouterr().out
    for name in ("change_of_variables.json", "change_of_variables.png"):
        assert (tmp_path / name).stat().st_size > 100
