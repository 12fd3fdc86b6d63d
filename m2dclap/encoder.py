"""The ViT audio encoder f_theta and its chunked inference for audio of any length.

State-dict names equal the official encoder-only checkpoints: ``cls_token, pos_embed,
patch_embed.proj.*, blocks.N.*, norm.*``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EncoderCfg
from .layers import Block, PatchEmbed, init_vit_weights, resample_pos_embed, sincos_2d_pos_embed


class AudioEncoder(nn.Module):
    """ViT over normalised log-mel spectrograms (B, 1, F, T)."""

    def __init__(self, cfg: EncoderCfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # Fixed sin-cos embedding, stored (as officially) as a frozen parameter so checkpoints carry it.
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(D, cfg.grid_size), requires_grad=False)
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            [Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, norm_layer) for _ in range(cfg.depth)]
        )
        self.norm = norm_layer(D)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: treat the conv like a Linear
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(init_vit_weights)
        init_vit_weights(self.norm)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return self.cfg.grid_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def set_input_size(self, input_size: tuple[int, int]) -> None:
        """Change the chunk size, resampling the position embedding (bicubic) to the new grid."""
        old_grid = self.cfg.grid_size
        self.cfg.input_size = tuple(input_size)
        new = resample_pos_embed(self.pos_embed.data, old_grid, self.cfg.grid_size)
        self.pos_embed = nn.Parameter(new, requires_grad=False)

    # -- forward ----------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 1, F, T) -> (B, N, D) tokens with position embedding added, and their (F', T') grid.

        A chunk shorter than the model's input keeps the first T' time columns of the embedding.
        """
        tokens, (gf, gt) = self.patch_embed(x)
        full_f, full_t = self.grid_size
        if gf != full_f or gt > full_t:
            raise ValueError(
                f"input of {x.shape[-2]}x{x.shape[-1]} gives a {gf}x{gt} patch grid; the model "
                f"takes at most {full_f}x{full_t} (input size {self.cfg.input_size})"
            )
        pos = self.pos_embed[:, 1:]
        if gt < full_t:
            pos = pos.reshape(1, full_f, full_t, -1)[:, :, :gt].reshape(1, gf * gt, -1)
        return tokens + pos.to(tokens.dtype), (gf, gt)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n, D) position-embedded tokens (any subset) -> (B, 1 + n, D) with CLS, after the blocks."""
        cls = (self.cls_token + self.pos_embed[:, :1]).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, F, T<=input) -> (B, 1 + F'*T', D) normalised tokens, CLS first."""
        tokens, _ = self.patchify(x)
        return self.forward_tokens(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    # -- chunked inference --------------------------------------------------------------------------
    def encode_lms(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel (B, 1, F, T) of any length -> patch features (B, F', T'_total, D).

        The official rule: right-pad with zeros (the mean, in the normalised domain) by
        ``(p - T % U % p) % p`` frames, cut into chunks of U = input frames, encode each chunk, drop CLS,
        concatenate along time. All full chunks of the batch go through the encoder in one forward.
        """
        B, _, _, T = lms.shape
        U, p = self.cfg.input_size[1], self.cfg.patch_size[1]
        pad = (p - (T % U % p)) % p
        if pad:
            lms = F.pad(lms, (0, pad))
        T = lms.shape[-1]
        n_full, rest = divmod(T, U)
        outputs = []
        if n_full:
            chunks = lms[..., : n_full * U].unflatten(-1, (n_full, U))  # (B, 1, F, n, U)
            chunks = chunks.permute(0, 3, 1, 2, 4).reshape(B * n_full, 1, lms.shape[2], U)
            z = self._encode_chunks(chunks)  # (B*n, F', t, D)
            z = z.unflatten(0, (B, n_full)).permute(0, 2, 1, 3, 4)  # (B, F', n, t, D)
            outputs.append(z.flatten(2, 3))  # (B, F', n*t, D)
        if rest:
            outputs.append(self._encode_chunks(lms[..., n_full * U :]))
        return torch.cat(outputs, dim=2)

    def encode_lms_list(self, lms_list: list[torch.Tensor], max_chunks: int = 64) -> list[torch.Tensor]:
        """Clips of different lengths, each (1, F, T_i) -> patch features (F', T'_i, D) per clip.

        Every clip is padded and cut as in :meth:`encode_lms`; chunks of equal length from all clips are
        encoded together (at most ``max_chunks`` per forward), so a batch of varied lengths costs about as
        much as one of equal lengths.
        """
        U, p = self.cfg.input_size[1], self.cfg.patch_size[1]
        pieces: list[tuple[int, int, torch.Tensor]] = []  # (clip, chunk position, (1, F, len))
        for i, lms in enumerate(lms_list):
            T = lms.shape[-1]
            lms = F.pad(lms, (0, (p - (T % U % p)) % p))
            for j, start in enumerate(range(0, lms.shape[-1], U)):
                pieces.append((i, j, lms[..., start : start + U]))
        by_len: dict[int, list[int]] = {}
        for k, (_, _, chunk) in enumerate(pieces):
            by_len.setdefault(chunk.shape[-1], []).append(k)
        encoded: list[torch.Tensor | None] = [None] * len(pieces)
        for ks in by_len.values():
            for s in range(0, len(ks), max_chunks):
                group = ks[s : s + max_chunks]
                z = self._encode_chunks(torch.stack([pieces[k][2] for k in group]))  # (n, F', t, D)
                for k, zk in zip(group, z):
                    encoded[k] = zk
        out: list[list[torch.Tensor]] = [[] for _ in lms_list]
        for (i, _, _), zk in zip(pieces, encoded):  # pieces are in clip, then time order
            out[i].append(zk)
        return [torch.cat(parts, dim=1) for parts in out]  # (F', T'_i, D)

    def _encode_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        z = self.forward_features(chunks)[:, 1:]  # drop CLS: (B, F'*t, D)
        gf = self.grid_size[0]
        return z.unflatten(1, (gf, -1))  # (B, F'*t, D) -> (B, F', t, D)


def frame_features(patches: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 2: (B, F', T', D) -> (B, T', F'*D), lowest-frequency patch first."""
    B, Fp, Tp, D = patches.shape
    return patches.transpose(1, 2).reshape(B, Tp, Fp * D)


def clip_features(patches: torch.Tensor) -> torch.Tensor:
    """z'' = mean over time of the frame features: (B, F', T', D) -> (B, F'*D)."""
    return frame_features(patches).mean(dim=1)
