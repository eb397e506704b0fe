"""Classifier-free guidance (Ho & Salimans 2022) as a score function, so that every sampler can use it.

A class-conditional denoiser trained with label dropout models both p_t(x | y) (labels=y) and p_t(x)
(labels=None, the null class). Guidance with scale w samples from the tilted score
    score_w(x, t) = score(x, t | null) + w (score(x, t | y) - score(x, t | null)),
so w = 0 is the unconditional model, w = 1 the conditional one, and w > 1 sharpens towards the class.
Since the score is linear in eps_hat, guiding the score, eps or x0 prediction is the same thing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["guided_score"]


def guided_score(denoiser: Callable, labels: Tensor, guidance: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """score_fn(x: (B, *S), t: (B,) or ()) -> (B, *S) for class labels (B,) at guidance scale w.

    denoiser(x, t, labels=...) is a class-conditional score (e.g. sdekit.precond.Denoiser over a net with
    num_classes); labels=None asks for the unconditional score. w = 0 and w = 1 call the network once, on the
    unconditional or conditional input only, so they reproduce those models exactly; other w batch both
    halves into one network call of 2B.
    """
    w = float(guidance)
    if not torch.isfinite(torch.tensor(w)):
        raise ValueError(f"guidance scale must be finite, got {guidance!r}")
    if not isinstance(labels, Tensor) or labels.ndim != 1:
        raise ValueError(f"labels must be a (B,) tensor of class indices, got {getattr(labels, 'shape', labels)!r}")
    net = getattr(denoiser, "net", None)
    null = getattr(net, "num_classes", None)
    if net is not None and null is None:
        raise ValueError("guidance needs a class-conditional network (built with num_classes)")

    def score_fn(x: Tensor, t) -> Tensor:
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"guided score: batch of {x.shape[0]} but {labels.shape[0]} labels")
        y = labels.to(x.device)
        if w == 0.0:
            return denoiser(x, t)
        if w == 1.0:
            return denoiser(x, t, labels=y)
        if null is None:  # a plain callable: two calls
            cond, uncond = denoiser(x, t, labels=y), denoiser(x, t)
        else:             # one call on [x; x] with [y; null]
            t2 = t.repeat(2) if isinstance(t, Tensor) and t.ndim == 1 else t
            cond, uncond = denoiser(torch.cat([x, x]), t2, labels=torch.cat([y, torch.full_like(y, null)])).chunk(2)
        return uncond + w * (cond - uncond)

    return score_fn
