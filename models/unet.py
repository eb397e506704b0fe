"""U-Net noise-conditional network for images (B, C, H, W), optionally class-conditional.

Ho et al. (2020) / Song et al. (2021) layout: residual blocks conditioned on the noise (and class)
embedding by a per-channel scale and shift applied after their second normalisation (Dhariwal & Nichol
2021, "scale-shift norm"; added before a GroupNorm, a per-channel constant is removed again whenever a
group holds a single channel), self-attention at chosen resolutions, stride-2 down- and nearest-neighbour up-sampling,
and skip connections from every encoder block to the matching decoder block. Works for any H, W that
divide by 2^(levels - 1) (8x8 digits with 2-3 levels, 32x32 images with 3-4).

Class conditioning: with num_classes=K the embedding table holds K + 1 rows, the last being the
*null* class used for label dropout in training and for the unconditional half of classifier-free
guidance; labels=None means "all null".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["UNet", "ResBlock", "Attention", "noise_embedding", "norm_groups"]


def noise_embedding(c: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of the noise level c: (B,) -> (B, dim) (c = log(sigma)/4 is O(1), hence the x1000 scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c.device, dtype=torch.float32) / half)
    angles = 1000.0 * c.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def norm_groups(ch: int) -> int:
    """Groups of the GroupNorm over ch channels: the most, up to 8, that leave at least 4 channels per group
    (1 when none does). A one-channel group normalises each channel over space alone, which erases it
    at a 1x1 resolution."""
    return max((g for g in range(1, 9) if ch % g == 0 and ch // g >= 4), default=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(ch), ch)


class ResBlock(nn.Module):
    """norm-SiLU-conv, norm * (1 + scale) + shift with (scale, shift) = Linear(emb) per channel, SiLU-dropout-conv,
    plus a 1x1 skip when widths differ. x: (B, C_in, H, W), emb: (B, E) -> (B, C_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)   # (scale, shift) per output channel
        self.norm2, self.drop, self.conv2 = _norm(c_out), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: deep stacks train from step one
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.emb(emb), "b (two c) -> two b c 1 1", two=2)
        h = self.norm2(h) * (1 + scale) + shift     # after the norm, so no normalisation can remove the conditioning
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual. x: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, ch: int, heads: int = 1):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} must divide by heads {heads}")
        self.heads, self.norm = heads, _norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d", three=3, n=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b n (h w) d -> b (n d) h w", h=h, w=w))


class UNet(nn.Module):
    """UNet(data_shape=(C, H, W)) maps (x: (B, C, H, W), c_noise: (B,) or (), labels: (B,) long | None) -> (B, C, H, W).

    channels: base width; channel_mult: width multiplier per resolution level (len = number of levels);
    num_res_blocks: residual blocks per level; attn_resolutions: spatial sizes (e.g. [4]) that get
    self-attention after each residual block; num_classes: class-conditional with a null class when set.
    """

    def __init__(self, data_shape: tuple[int, int, int], channels: int = 64, channel_mult: list[int] | tuple[int, ...] = (1, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: list[int] | tuple[int, ...] = (), heads: int = 1,
                 dropout: float = 0.0, emb_dim: int | None = None, num_classes: int | None = None):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"UNet is for images (C, H, W), got data shape {tuple(data_shape)}")
        c, H, W = (int(s) for s in data_shape)
        levels = len(channel_mult)
        if levels < 1 or channels < 1 or num_res_blocks < 1 or any(m < 1 for m in channel_mult):
            raise ValueError(f"UNet needs channels, num_res_blocks and every channel_mult >= 1, got "
                             f"{channels}, {num_res_blocks}, {list(channel_mult)}")
        if H % 2 ** (levels - 1) or W % 2 ** (levels - 1):
            raise ValueError(f"image size {H}x{W} must divide by 2^(levels-1) = {2 ** (levels - 1)} "
                             f"for channel_mult of length {levels}; use fewer levels")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or null, got {num_classes}")
        self.data_shape, self.num_classes = (c, H, W), num_classes
        emb_dim = emb_dim or 4 * channels
        self.emb_dim, self.channels = emb_dim, channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None  # row num_classes = null
        self.stem = nn.Conv2d(c, channels, 3, padding=1)
        attn = set(int(r) for r in attn_resolutions)

        # encoder: widths of every stored skip, in order
        self.down = nn.ModuleList()
        skips, ch, res = [channels], channels, H
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if res in attn:
                    block.append(Attention(ch, heads))
                self.down.append(block)
                skips.append(ch)
            if i < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), Attention(ch, heads), ResBlock(ch, ch, emb_dim, dropout)])

        # decoder: one more block per level than the encoder, each eating one skip
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if res in attn:
                    block.append(Attention(ch, heads))
                self.up.append(block)
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.out_norm, self.out_conv = _norm(ch), nn.Conv2d(ch, c, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)  # the zero predictor at init, as models/mlp.py
        nn.init.zeros_(self.out_conv.bias)

    def embed(self, c_noise: Tensor, labels: Tensor | None, batch: int) -> Tensor:
        """Noise (+ class) embedding (B, emb_dim)."""
        c_noise = c_noise.expand(batch) if c_noise.ndim == 0 else c_noise
        emb = self.time_mlp(noise_embedding(c_noise, self.channels).to(self.stem.weight.dtype))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=c_noise.device)
            labels = labels.to(device=c_noise.device, dtype=torch.long)
            if labels.shape != (batch,) or bool(((labels < 0) | (labels > self.num_classes)).any()):
                raise ValueError(f"labels must be (B,)=({batch},) in [0, {self.num_classes}] ({self.num_classes} = null class), "
                                 f"got shape {tuple(labels.shape)}")
            emb = emb + self.label_emb(labels)
        elif labels is not None:
            raise ValueError("labels were given to a UNet built without num_classes")
        return emb

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"UNet expects x of shape (B, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")
        emb = F.silu(self.embed(c_noise, labels, x.shape[0]))
        h = self.stem(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))

    @staticmethod
    def _run(block: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h
