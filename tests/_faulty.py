"""Networks and writers that fail on purpose, for tests/test_reliability.py."""
import sys
from pathlib import Path

import torch
from torch import nn


class NaNNet(nn.Module):
    """A linear score network whose output is NaN on the forward calls numbered in [nan_from, nan_until)."""

    def __init__(self, data_shape, nan_from: int = 10**9, nan_until: int = 10**9):
        super().__init__()
        self.lin = nn.Linear(data_shape[0] + 1, data_shape[0])
        self.calls, self.nan_from, self.nan_until = 0, nan_from, nan_until

    def forward(self, x, c_noise):
        out = self.lin(torch.cat([x, c_noise[:, None]], 1))
        self.calls += 1
        if self.nan_from <= self.calls - 1 < self.nan_until:
            out = out * float("nan")
        return out


class WrongShapeNet(nn.Module):
    """Returns one feature too many: not a score model for its data."""

    def __init__(self, data_shape):
        super().__init__()
        self.lin = nn.Linear(data_shape[0], data_shape[0] + 1)

    def forward(self, x, c_noise):
        return self.lin(x)


if __name__ == "__main__":
    # Checkpoint writer that never stops: the test kills it at random moments.
    from sdekit.checkpoint import prune_checkpoints, save_checkpoint

    run, step = Path(sys.argv[1]), 0
    while True:
        step += 1
        big = torch.full((2_000_000,), float(step))
        save_checkpoint(run, step, {"model": {"w": big}, "ema": {"w": big + 1}}, {"note": "fault test"})
        prune_checkpoints(run, 2)
