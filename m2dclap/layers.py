"""Transformer building blocks in timm's layout (state-dict names match timm / the official M2D code).

Layer types are passed in as arguments; attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchEmbed(nn.Module):
    """(B, 1, F, T) spectrogram -> (B, N, D) patch tokens, frequency-major ``(f t)`` order.

    A Conv2d with kernel = stride; a trailing partial patch is dropped (floor), as in the official code.
    """

    def __init__(self, patch_size: tuple[int, int], embed_dim: int, in_chans: int = 1):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, 1, F, T) -> (B, D, F', T')
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, D, F', T') -> (B, F'*T', D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, C/H)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, H, N, C/H) -> (B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


def init_vit_weights(module: nn.Module) -> None:
    """MAE initialisation: Xavier-uniform Linear, zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(p w_i), cos(p w_i)] with w_i = 1/10000^(i/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_pos_embed(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (1, [1 +] F'*T', dim) in the official layout.

    Tokens are frequency-major; the first half of the channels encodes the time index and the second
    half the frequency index (MAE's meshgrid(w, h) puts the w = time coordinate first). The CLS row is zero.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    gf, gt = grid
    f_idx, t_idx = np.meshgrid(np.arange(gf), np.arange(gt), indexing="ij")  # each (F', T')
    emb = np.concatenate([sincos_1d(dim // 2, t_idx), sincos_1d(dim // 2, f_idx)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def resample_pos_embed(
    posemb: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resize a (1, prefix + F*T, D) position embedding from ``old_grid`` to ``new_grid`` (freq, time).

    Both grids are required because spectrogram grids are not square. Interpolates in float32 without
    antialiasing (as the official fine-tuning code does) and casts back. Same grid -> identity.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    n_old = posemb.shape[1] - num_prefix_tokens
    if n_old != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {n_old} grid tokens, not {old_grid[0]}x{old_grid[1]}")
    if old_grid == new_grid:
        return posemb
    prefix, grid_tokens = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dtype = posemb.dtype
    x = grid_tokens.float().reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)  # (1, D, F, T)
    x = F.interpolate(x, size=new_grid, mode=mode, align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(dtype)  # (1, D, F, T) -> (1, N, D)
    return torch.cat([prefix, x], dim=1)
