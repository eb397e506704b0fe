"""`sdekit ito`: every Ito-correction demonstration of sdekit.ito, a table, ito.json and ito.png in --out."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .._imports import pyplot
from ..ito import EXAMPLE_FUNCTIONS, ItoResult, run_all

__all__ = ["main", "plot"]


def _table(rows: list[ItoResult]) -> str:
    head = f"{'quantity':<34} {'estimate':>10} {'std.err':>9} {'theory':>10} {'z':>7} {'naive':>10} {'z naive':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<34} {r.estimate:>10.4f} {r.stderr:>9.4f} {r.theory:>10.4f} {r.z_theory:>7.2f} "
                     f"{r.naive:>10.4f} {r.z_naive:>9.1f}")
    return "\n".join(lines)


def _rows(res: dict) -> list[ItoResult]:
    return [res["w_squared"], res["riemann"].left_minus_strat, res["riemann"].mid_minus_strat, res["gbm"],
            *res["drift"].results, res["conversion_gbm"].mean_diff, res["conversion_gbm"].mean_diff_corrected]


def _to_json(obj):
    if isinstance(obj, ItoResult):
        return obj.as_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _to_json(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def plot(res: dict, path: Path) -> None:
    """Five panels: E[W_t^2], the two Riemann sums, GBM's E[log X_t], the drift of f(X), and the conversion."""
    plt = pyplot("ito.png")

    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    ax = ax.ravel()
    w = res["w_squared"].extra
    t = torch.tensor(w["t"])
    ax[0].plot(t, w["mean_W2_t"], label="Monte Carlo E[W_t^2]")
    ax[0].plot(t, t, "k--", label="Ito: t")
    ax[0].plot(t, 0 * t, "r:", label="naive chain rule: 0")
    ax[0].set(title="d(W^2) = 2W dW + dt", xlabel="t")
    ax[0].legend()

    r = res["riemann"]
    ax[1].loglog(r.steps, r.ms_left_ito, "o-", label="left sum vs (W^2-T)/2")
    ax[1].loglog(r.steps, r.theory_ms_left_ito(), "k--", lw=0.8, label="T^2/(2n)")
    ax[1].loglog(r.steps, r.ms_mid_strat, "s-", label="midpoint sum vs W^2/2")
    ax[1].loglog(r.steps, r.theory_ms_mid_strat(), "k:", lw=0.8, label="T^2/(4n)")
    ax[1].loglog(r.steps, r.ms_left_strat, "^-", label="left sum vs W^2/2")
    ax[1].loglog(r.steps, r.ms_mid_ito, "v-", label="midpoint sum vs (W^2-T)/2")
    ax[1].set(title="mean-square error of sums of W dW", xlabel="steps n")
    ax[1].legend(fontsize=8)

    gb = res["gbm"]
    e = gb.extra
    tt = torch.tensor(e["t"])
    m, s = torch.tensor(e["mean_log_x_t"]), torch.tensor(e["se_log_x_t"])
    ax[2].plot(tt, m, label="Monte Carlo E[log X_t]")
    ax[2].fill_between(tt, m - 2 * s, m + 2 * s, alpha=0.3)
    ax[2].plot(tt, math.log(e["x0"]) + (e["mu"] - e["sigma"] ** 2 / 2) * tt, "k--", label="Ito: (mu - sigma^2/2) t")
    ax[2].plot(tt, math.log(e["x0"]) + e["mu"] * tt, "r:", label="naive: mu t")
    ax[2].set(title="GBM: E[log X_t]", xlabel="t")
    ax[2].legend()

    d = res["drift"]
    xs = torch.tensor(d.x0)
    ax[3].errorbar(xs, [r.estimate for r in d.results], yerr=[2 * r.stderr for r in d.results], fmt="o", label="Monte Carlo")
    ax[3].plot(xs, [r.theory for r in d.results], "k--", label="f'b + g^2 f''/2 (Ito)")
    ax[3].plot(xs, [r.naive for r in d.results], "r:", label="f'b (naive)")
    ax[3].set(title=f"drift of f(X), f = {res['f_name']}, dX = -X dt + g(X) dW", xlabel="x0")
    ax[3].legend()

    for key, name, style in (("conversion_gbm", "GBM", "-"), ("conversion_nonlinear", "nonlinear g", "--")):
        c = res[key]
        ax[4].loglog(c.steps, c.rms_em_heun, "o" + style, label=f"{name}: EM vs Heun")
        ax[4].loglog(c.steps, c.rms_em_heun_corrected, "s" + style, label=f"{name}: EM vs Heun(b - g g'/2)")
    ax[4].set(title="Ito <-> Stratonovich on the same increments (RMS at T)", xlabel="steps")
    ax[4].legend(fontsize=8)
    ax[5].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdekit ito", description="Ito-correction demonstrations: numbers that show why the "
                                                               "ordinary chain rule fails for SDEs.")
    p.add_argument("--out", default="runs/ito", help="output folder for ito.json and ito.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every number of Monte Carlo paths")
    p.add_argument("--f", dest="f_name", default="sin", choices=sorted(EXAMPLE_FUNCTIONS),
                   help="f for the Ito's-lemma demonstration (library users pass any torch function)")
    args = p.parse_args(argv)
    res = run_all(args.seed, args.scale, args.f_name)
    print(_table(_rows(res)))
    for key in ("conversion_gbm", "conversion_nonlinear"):
        c = res[key]
        print(f"\n{key}: RMS at T between schemes on the same increments")
        print(f"{'steps':>7} {'EM-Heun':>10} {'EM-Heun corr':>13}")
        for n, a, bb in zip(c.steps, c.rms_em_heun, c.rms_em_heun_corrected):
            print(f"{n:>7} {a:>10.4f} {bb:>13.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ito.json").write_text(json.dumps(_to_json({"seed": args.seed, "scale": args.scale, **res}), indent=1))
    plot(res, out / "ito.png")
    print(f"\nwrote {out / 'ito.json'} and {out / 'ito.png'}")
    return 0
