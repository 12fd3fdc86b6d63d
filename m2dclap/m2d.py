"""Masked Modeling Duo: masking, the predictor g_theta, the target network f_xi, Eq. 1 and the EMA.

The target network shares the online patch embedding, position embedding and CLS token (as officially)
and owns copies of the blocks and final norm (``target_blocks``, ``target_norm``), updated only by EMA.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EncoderCfg, PredictorCfg
from .encoder import AudioEncoder
from .layers import Block, init_vit_weights, sincos_2d_pos_embed


def random_masking(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random unstructured masking, as MAE/M2D: argsort of uniform noise.

    Returns ``ids_keep`` (B, n_keep) visible indices, ``ids_masked`` (B, N - n_keep) masked indices and
    ``ids_restore`` (B, N), with n_keep = int(N * (1 - ratio)) (official: 57 of 190 at ratio 0.7).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    n_keep = int(num_tokens * (1 - mask_ratio))
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    return ids_shuffle[:, :n_keep], ids_shuffle[:, n_keep:], ids_restore


def take(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N, D) gathered at (B, n) indices -> (B, n, D)."""
    return tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class Predictor(nn.Module):
    """g_theta: visible features + mask tokens + position embedding -> predicted target features."""

    def __init__(self, enc: EncoderCfg, cfg: PredictorCfg):
        super().__init__()
        W = cfg.embed_dim
        self.decoder_embed = nn.Linear(enc.embed_dim, W)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W))
        self.decoder_pos_embed = nn.Parameter(sincos_2d_pos_embed(W, enc.grid_size), requires_grad=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            [Block(W, cfg.num_heads, cfg.mlp_ratio, True, norm_layer) for _ in range(cfg.depth)]
        )
        self.decoder_norm = norm_layer(W)
        self.decoder_pred = nn.Linear(W, enc.embed_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_vit_weights)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + n_keep, D) with CLS -> predictions for the masked tokens (B, n_mask, D)."""
        x = self.decoder_embed(latent)
        B, N = ids_restore.shape
        n_vis = x.shape[1] - 1
        mask_tokens = self.mask_token.to(x.dtype).expand(B, N - n_vis, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order: visible first
        x_ = take(x_, ids_restore)  # unshuffle to the patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed[:, : N + 1].to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, D)
        return take(x, ids_masked)


class TargetEncoder(nn.Module):
    """f_xi: EMA copies of the online blocks and norm; patch/position embeddings are the online ones."""

    def __init__(self, online: AudioEncoder):
        super().__init__()
        self.target_blocks = copy.deepcopy(online.blocks)
        self.target_norm = copy.deepcopy(online.norm)
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, online: AudioEncoder, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n, D) position-embedded masked patches -> (B, n, D) target features (CLS dropped)."""
        cls = (online.cls_token + online.pos_embed[:, :1]).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for blk in self.target_blocks:
            x = blk(x)
        return self.target_norm(x)[:, 1:]

    @torch.no_grad()
    def update(self, online: AudioEncoder, momentum: float) -> None:
        """xi <- alpha xi + (1 - alpha) theta."""
        online_params = list(online.blocks.parameters()) + list(online.norm.parameters())
        target_params = list(self.target_blocks.parameters()) + list(self.target_norm.parameters())
        torch._foreach_lerp_(
            target_params, [p.detach().to(t.dtype) for p, t in zip(online_params, target_params)], 1.0 - momentum
        )


def m2d_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Paper Eq. 1 on per-token standardised targets: mean over masked tokens of 2 - 2 cos(pred, target).

    The official code standardises each target token over its channels with var + 1e-6 (norm_pix_loss).
    """
    target = target.float()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps).sqrt()
    pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target, dim=-1)
    return (2 - 2 * (pred * target).sum(-1)).mean()


def ema_momentum(step: int, total_steps: int, start: float = 0.99995, end: float = 0.99999) -> float:
    """EMA decay rising linearly per step from ``start`` to ``end`` over the run (paper IV-A2)."""
    if total_steps <= 1:
        return end
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac


class M2DCLAPPretrainer(nn.Module):
    """The M2D-X network of the paper's pretraining stages around an :class:`~m2dclap.model.M2DCLAP`.

    Stage 1 (``lambda_m2d`` > 0): M2D on the masked spectrogram plus CLAP on the visible features z_v (Eq. 5).
    Stage 2/2.1 (``lambda_m2d`` = 0): CLAP only; the audio encoder is frozen and sees the visible patches
    of a low (2) or zero (2.1) masking ratio. The predictor and target network exist only when M2D is on.

    Args:
        model: the model being trained (its encoder is the online encoder f_theta).
        mask_ratio: fraction of patches masked (0.7 stage 1, 0.3 stage 2, 0.0 stage 2.1).
        lambda_m2d: weight of L_m2d (1.0 in stage 1, 0 afterwards).
        lambda_clap: weight of L_clap (0.01 in stage 1, 1.0 in stage 2).
        world_size, rank: for the contrastive loss's autograd-aware gather.
    """

    def __init__(
        self,
        model: nn.Module,
        mask_ratio: float = 0.7,
        lambda_m2d: float = 1.0,
        lambda_clap: float = 0.01,
        world_size: int = 1,
        rank: int = 0,
    ):
        super().__init__()
        from .clap import ContrastiveLoss

        self.model = model
        self.mask_ratio, self.lambda_m2d, self.lambda_clap = mask_ratio, lambda_m2d, lambda_clap
        if lambda_m2d > 0:
            self.predictor = Predictor(model.cfg.encoder, model.cfg.predictor)
            self.target = TargetEncoder(model.encoder)
        else:
            self.predictor, self.target = None, None
        self.clap_loss = ContrastiveLoss(world_size, rank)

    def forward(
        self,
        lms: torch.Tensor,
        text_emb: torch.Tensor | None = None,
        texts: list[str] | None = None,
        positive_groups: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """lms: normalised log-mel crops (B, 1, F, T). Text as pre-computed embeddings or strings."""
        model, enc = self.model, self.model.encoder
        encoder_trains = any(p.requires_grad for p in enc.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):
            tokens, _ = enc.patchify(lms.to(model.dtype))  # (B, N, D), position-embedded
            B, N, _ = tokens.shape
            ids_keep, ids_masked, ids_restore = random_masking(B, N, self.mask_ratio, tokens.device, generator)
            latent = enc.forward_tokens(take(tokens, ids_keep))  # (B, 1 + n_keep, D): CLS + z_v
        out: dict[str, torch.Tensor] = {}
        loss = latent.new_zeros((), dtype=torch.float32)
        if self.lambda_m2d > 0:
            pred = self.predictor(latent, ids_restore, ids_masked)  # z_hat_m
            target = self.target(enc, take(tokens, ids_masked).detach())  # z_m, target sees masked patches only
            out["m2d_loss"] = m2d_loss(pred, target)
            loss = loss + self.lambda_m2d * out["m2d_loss"]
        if self.lambda_clap > 0:
            if text_emb is not None:
                s_t = model.encode_text_embeddings(text_emb)
            elif texts is not None:
                s_t = model.project_text(texts)
            else:
                raise ValueError("CLAP needs text: pass text_emb (pre-computed) or texts")
            s_a = model.audio_proj(latent[:, 1:])  # z_v -> s_a, visible tokens only (as officially)
            scale = model.logit_scale.exp().clamp(max=model.cfg.max_logit_scale)
            out["clap_loss"] = self.clap_loss(s_a, s_t, scale, positive_groups)["contrastive_loss"]
            out["logit_scale"] = scale.detach()
            loss = loss + self.lambda_clap * out["clap_loss"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        if self.target is not None:
            self.target.update(self.model.encoder, momentum)
