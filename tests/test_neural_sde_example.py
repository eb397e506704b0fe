"""examples/neural_sde.py: sdekit's adjoint and torchsde's on one neural SDE, the same data and Brownian paths."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchsde")
pytest.importorskip("matplotlib")

_spec = importlib.util.spec_from_file_location("neural_sde", Path(__file__).parents[1] / "examples" / "neural_sde.py")
neural_sde = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(neural_sde)


def test_first_gradients_of_both_adjoints_equal_backprop_to_round_off():
    """Fast: one minibatch, one model: sdekit's reversible adjoint, torchsde's adjoint_reversible_heun and plain
    backprop through sdekit's eager solve are the same discrete gradient (float64; bound 100 N eps)."""
    data = neural_sde.make_data(16, 0.5, seed=3)
    torch.manual_seed(3)
    model = neural_sde.NeuralSDE(8).to(torch.float64)
    args = (model, data["ts"], data["dW"], data["x"])
    (la, ga), (lt, gt), (lb, gb) = (neural_sde.BACKENDS[k](*args) for k in ("sdekit", "torchsde", "sdekit_backprop"))
    tol = 100 * (data["ts"].shape[0] - 1) * torch.finfo(torch.float64).eps
    assert abs(float(la - lb)) <= tol * float(lb) and abs(float(lt - lb)) <= tol * float(lb)
    assert neural_sde.max_rel_diff(ga, gb) < tol and neural_sde.max_rel_diff(gt, gb) < tol


@pytest.mark.slow
def test_quick_run_matches_torchsde_and_learns_the_drift(tmp_path):
    assert neural_sde.main(["--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "neural_sde.json").read_text())
    assert (tmp_path / "neural_sde.png").stat().st_size > 0
    # the same gradients at the first step, to round-off (float64, N steps: 100 N eps)
    tol = 100 * res["config"]["steps"] * torch.finfo(torch.float64).eps
    fg = res["first_gradients_max_rel_diff"]
    assert fg["sdekit_vs_torchsde"] < tol and fg["sdekit_vs_backprop"] < tol, fg
    # both trainings reduce the loss, and the learned drift is nearer x - x^3 than the initial one
    for k in ("sdekit", "torchsde"):
        c = res["curves"][k]
        assert sum(c[-5:]) < 0.5 * sum(c[:5]), (k, c[:5], c[-5:])
        assert res["drift"][f"{k}_rms"] < res["drift"]["initial_rms"], res["drift"]
        assert res["drift"][f"{k}_rms_on_data"] < res["drift"]["initial_rms_on_data"], res["drift"]
    # timings and memory are reported for both (their values are the run's, not asserted here: shared CPU)
    assert {"sdekit", "torchsde", "ratio_sdekit_over_torchsde"} <= set(res["seconds_per_iteration"])
    assert {r["backend"] for r in res["memory"]} == {"sdekit", "torchsde", "sdekit_backprop"}
