"""A small digits classifier, trained reproducibly by sdekit itself: the feature extractor of the
Frechet distance (FD) and the judge of class accuracy for conditional samples (sdekit.image_metrics).

Nothing is downloaded: the network is trained on the training split of the run being judged (by default
test_fraction 0.2, split seed 0, as configs/digits*.yaml), so that its held-out images are never the
classifier's training data, from a fixed seed in about 10-20 s on 2 CPU cores, and cached per split in the
folder the caller names (safetensors + JSON with its held-out accuracy); `sdekit sample` uses the run's own
<run>/eval_cache/ (sdekit.sampling.eval_cache_dir), never the current directory.

    sdekit classifier --run runs/digits       # train (or load the cached copy) and print the test accuracy
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitsClassifier", "train_classifier", "accuracy", "digits_classifier", "CLASSIFIER_SETTINGS"]

CLASSIFIER_SETTINGS = dict(seed=0, epochs=15, batch_size=64, lr=3e-3, width=16, features=128, split_seed=0,
                           test_fraction=0.2, max_shift=1)


class DigitsClassifier(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> logits (B, K); `features` gives the (B, F) penultimate layer used by FD."""

    def __init__(self, channels: int = 1, n_classes: int = 10, width: int = 32, features: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, features), nn.SiLU())
        self.head = nn.Linear(features, n_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Random translations by up to max_shift pixels (zero-padded with the background value -1)."""
    if max_shift == 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (B,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H))[:, :, None]                # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, :]                # (B, 1, W)
    return padded[torch.arange(B)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def train_classifier(x: Tensor, y: Tensor, n_classes: int, seed: int = 0, epochs: int = 30, batch_size: int = 64,
                     lr: float = 2e-3, width: int = 32, features: int = 128, max_shift: int = 1,
                     progress: bool = False) -> DigitsClassifier:
    """Train on x: (N, C, H, W), y: (N,) with every random draw (init, order, shifts) from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier(x.shape[1], n_classes, width, features)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-x.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    with torch.enable_grad():  # callers may sit inside no_grad (evaluation)
        _fit(model, opt, sched, x, y, epochs, batch_size, max_shift, gen, progress)
    return model.eval()


def _fit(model, opt, sched, x, y, epochs, batch_size, max_shift, gen, progress) -> None:
    from tqdm.auto import tqdm

    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], max_shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Share of x: (N, C, H, W) classified as y: (N,)."""
    return float((model(x).argmax(1) == y).double().mean())


def digits_classifier(cache_dir: str | Path, progress: bool = False, split_seed: int | None = None,
                      test_fraction: float | None = None) -> tuple[DigitsClassifier, dict]:
    """The project's digits classifier and its record {'test_accuracy', settings...}, trained on the training split
    (split_seed, test_fraction; CLASSIFIER_SETTINGS' by default): loaded from cache_dir when a copy trained with
    these settings is there, else trained now and cached (written atomically)."""
    from safetensors.torch import load_file, save_file

    from .checkpoint import atomic_write_text
    from .images import load_images

    s = dict(CLASSIFIER_SETTINGS)
    if split_seed is not None:
        s["split_seed"] = split_seed
    if test_fraction is not None:
        s["test_fraction"] = test_fraction
    key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    weights, record_path = cache_dir / f"digits_{key}.safetensors", cache_dir / f"digits_{key}.json"
    model = DigitsClassifier(1, 10, s["width"], s["features"])
    if weights.is_file() and record_path.is_file():
        try:
            model.load_state_dict(load_file(str(weights)))
            return model.eval(), json.loads(record_path.read_text())
        except Exception:  # a damaged cache is retrained, never trusted
            pass
    train, test = load_images("digits", test_fraction=s["test_fraction"], seed=s["split_seed"])
    model = train_classifier(train.x, train.labels, 10, seed=s["seed"], epochs=s["epochs"], batch_size=s["batch_size"],
                             lr=s["lr"], width=s["width"], features=s["features"], max_shift=s["max_shift"], progress=progress)
    record = {**s, "test_accuracy": accuracy(model, test.x, test.labels), "n_train": len(train), "n_test": len(test)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    atomic_write_text(record_path, json.dumps(record, indent=1))
    return model, record
