"""The visual front end: patch embedding (``vision_model``), pixel shuffle and the ``mlp1`` projector.

Legend: N tiles, C channels (3), S tile side, P patch side, G = S / P patch grid, Cv patch width,
R = 1 / downsample_ratio, D decoder width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import MonoInternVLConfig, PatchEmbedConfig


class PatchEmbeddings(nn.Module):
    """``Conv2d(C, Cv, P, stride P)`` + learned position embedding; the class slot is prepended, then dropped.

    ``class_embedding`` stays a parameter (the release's state dict holds it) although its output is discarded.
    """

    def __init__(self, config: PatchEmbedConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim, self.patch_size, self.patch_size)
        num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, self.embed_dim))

    def _patch_positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        # Learned on a g x g grid; other tile sizes get a bicubic resize computed in fp32, cast back.
        pos = self.position_embedding[:, 1:]
        g = self.image_size // self.patch_size
        if (grid_h, grid_w) == (g, g):
            return pos
        dtype = pos.dtype
        grid = pos.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, grid_h * grid_w).permute(0, 2, 1).to(dtype)

    def forward(self, pixel_values_NCSS: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, (H/P) * (W/P), Cv)`` patch tokens, class slot removed."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values_NCSS.to(weight.dtype))  # (N, Cv, Gh, Gw)
        n, _, gh, gw = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(n, 1, -1).to(tokens.dtype)
        tokens = torch.cat([cls, tokens], dim=1)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(gh, gw)], dim=1)
        return (tokens + pos.to(tokens.dtype))[:, 1:]


class PatchEmbedModel(nn.Module):
    """``vision_model`` in the release layout (it holds only ``embeddings``)."""

    def __init__(self, config: PatchEmbedConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = PatchEmbeddings(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixel_values)


def pixel_shuffle(x_NHWC: torch.Tensor, ratio: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Space-to-depth by ``1/ratio``: ``(N, H, W, C) -> (N, H*ratio, W*ratio, C/ratio^2)``.

    ``v2`` order: output token ``(i, j)`` holds ``[x(2i, 2j), x(2i, 2j+1), x(2i+1, 2j), x(2i+1, 2j+1)]`` (for
    ratio 0.5), i.e. channels laid out ``[dy][dx][c]`` with dy outer. ``v1`` is the release's older variant,
    whose output grid comes out transposed.
    """
    n, h, w, c = x_NHWC.shape
    r = round(1 / ratio)
    if h % r or w % r:
        raise ValueError(f"pixel_shuffle needs a grid divisible by {r}, got {h}x{w}")
    out = x_NHWC.reshape(n, h // r, r, w // r, r, c).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(n, h // r, w // r, r * r * c)
    if version == "v1":
        out = out.transpose(1, 2)
    return out.contiguous()


def build_projector(config: MonoInternVLConfig) -> nn.Sequential:
    """``mlp1``: LayerNorm(R^2 Cv) -> Linear(R^2 Cv, D) -> GELU(erf) -> Linear(D, D) (indices 0, 1, 2, 3)."""
    r = round(1 / config.downsample_ratio)
    width = config.vision_config.hidden_size * r * r
    d = config.llm_config.hidden_size
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d), nn.GELU(), nn.Linear(d, d))
