"""Samplers: samples per second at a fixed NFE budget, and error against NFE from sdekit's accuracy report."""
from __future__ import annotations

import torch

import sdekit
from sdekit.samplers import SAMPLERS

from .timing import interleaved


def run(quick: bool, device: str, repeats: int, progress=print) -> dict:
    from sdekit.samplers.report import default_mixture
    sde = sdekit.VPSDE()
    gmm = default_mixture(torch.float32)
    if device != "cpu":
        gmm = gmm.to(device) if hasattr(gmm, "to") else gmm
    score = gmm.score_fn(sde)
    B, nfe = (2000, 40) if quick else (10_000, 100)
    m = {}
    for name, spec in SAMPLERS.items():
        kw = {"rtol": 1e-3, "atol": 1e-3} if spec.default_steps is None else {}
        _, info = sdekit.sample(score, sde, (1, 2), name, steps=1, return_info=True, generator=torch.Generator().manual_seed(0), **kw)
        steps = max(1, nfe // info["nfe"]) if spec.default_steps is not None else None
        m[name] = (lambda name=name, steps=steps, kw=kw: sdekit.sample(
            score, sde, (B, 2), name, steps=steps, generator=torch.Generator().manual_seed(0), device=device, **kw)) \
            if _takes_device() else (lambda name=name, steps=steps, kw=kw: sdekit.sample(
                score, sde, (B, 2), name, steps=steps, generator=torch.Generator().manual_seed(0), **kw))
    res = interleaved(m, repeats, device)
    base = res["euler_maruyama"]["median_s"]
    rows = [dict(sampler=k, batch=B, nfe_budget=nfe, **r, samples_per_s=B / r["median_s"] if "median_s" in r else None,
                 speed_vs_euler_maruyama=base / r["median_s"] if "median_s" in r else None) for k, r in res.items()]
    progress("  samplers: " + ", ".join(f"{r['sampler']} {r['speed_vs_euler_maruyama']:.2f}x" for r in rows if r.get("median_s")))
    accuracy = None
    try:
        from sdekit.samplers.report import run_report
        accuracy = run_report(nfes=(10, 20, 40) if quick else (10, 20, 40, 80, 160, 320), batch=128 if quick else 256,
                              n_samples=500 if quick else 2000, progress=False)
    except Exception as e:  # noqa: BLE001 - the accuracy report is another module's; its failure is a note
        accuracy = {"error": f"{type(e).__name__}: {e}"}
    return {"rows": rows, "accuracy": accuracy, "note": "rk45 at rtol=atol=1e-3 (adaptive: NFE is its own)"}


def _takes_device() -> bool:
    import inspect
    return "device" in inspect.signature(sdekit.sample).parameters
