"""EnCLAP captioner: BART over EnCodec tokens plus a CLAP embedding.

Follows EnCLAP (``jaeyeonkim99/EnCLAP``, ``modeling/enclap_bart.py`` and ``data/preprocess.py``):

* Encoder layout per clip: ``[BOS, BOS, frame_1 .. frame_T, EOS, pad ...]``. At codec positions the input
  is the sum of one embedding per codebook (tables of ``ceil(1025/64)*64 = 1088`` rows, row 1024 is the
  padding/mask id with a zero vector); at the other positions it is BART's token embedding. Slot 0 (the
  first BOS) is then overwritten with ``clap_projection(clap)``.
* Positions: slot 0 gets a zero positional embedding, slot j >= 1 gets BART's learned position j-1; then
  ``layernorm_embedding``, dropout and the stock BART encoder layers. The decoder is stock BART.
* Masked codec modelling (MCM): wav2vec2-style span masks, drawn independently per codebook on the clip's
  (16, T) code matrix (one rounding epsilon per clip, as ``_compute_mask_indices`` does); masked codes are
  replaced by id 1024; one ``Linear(d_model, 1024)`` head per codebook on the encoder output; codebook i's
  cross-entropy (mean over its masked positions in the batch) is weighted 1/2^(i+1); the sum is scaled by
  0.7 and added to the caption loss (cross-entropy with label smoothing 0.2).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "enclap_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class EnClapCfg:
    # Hugging Face name or local folder of the pretrained BART (EnCLAP base configs use facebook/bart-base).
    bart_name: str = "facebook/bart-base"
    # BartConfig as a dict; when set, BART is built from it with random weights (tiny tests, reloading).
    bart_config: dict[str, Any] | None = None
    # Tokenizer name or folder; None means the same as bart_name.
    tokenizer_name: str | None = None
    # Number of EnCodec codebooks (24 kHz model at 12 kbps -> 16).
    n_codebooks: int = 16
    # Codes per codebook; id `codebook_size` is EnCLAP's pad/mask id (encodec_pad_token_id = 1024).
    codebook_size: int = 1024
    # Dimension of the CLAP audio embedding (EnCLAP's d_clap = 512); set it to the CLAP backend's output size.
    clap_dim: int = 512
    # MCM span-masking probability (encodec_masking_prob).
    mcm_prob: float = 0.15
    # MCM span length in frames (encodec_masking_span).
    mcm_span: int = 10
    # Per-codebook MCM weights; None means EnCLAP's 1/2^(i+1) for codebook i.
    mcm_codebook_weights: list[float] | None = None
    # Scale of the summed MCM loss in the total loss (mcm_loss_scale).
    mcm_loss_scale: float = 0.7
    # Label smoothing of the caption cross-entropy.
    label_smoothing: float = 0.2
    # Beam size used by inference.py.
    num_beams: int = 4
    # No repeated n-grams of this size in generated captions.
    no_repeat_ngram_size: int = 3
    # Maximum generated length in tokens (decoder start token included, as in HF generate).
    max_length: int = 50

    def codebook_weights(self) -> list[float]:
        if self.mcm_codebook_weights is not None:
            if len(self.mcm_codebook_weights) != self.n_codebooks:
                raise ValueError("mcm_codebook_weights needs one weight per codebook")
            return [float(w) for w in self.mcm_codebook_weights]
        return [1.0 / 2 ** (i + 1) for i in range(self.n_codebooks)]


def span_mask(
    lengths: torch.Tensor | list[int],
    n_codebooks: int,
    max_len: int,
    prob: float,
    span: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Span masks (B, K, max_len), bool, as wav2vec2's ``_compute_mask_indices`` on each clip's (K, T) codes.

    Per clip of length T: ``n = int(prob * T / span + eps)`` spans (eps ~ U[0,1), one per clip), capped so
    the spans fit; each codebook draws its own n distinct start frames in ``[0, T - span]``. Spans may
    overlap, so the masked fraction is at most ``prob`` on average. Clips shorter than ``span`` get no mask
    (EnCLAP's preprocessing errors there).
    """
    lengths = [int(x) for x in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    out = torch.zeros(len(lengths), n_codebooks, max_len, dtype=torch.bool)
    if prob <= 0 or span < 1:
        return out
    offsets = torch.arange(span)
    for b, length in enumerate(lengths):
        eps = torch.rand((), generator=generator).item()
        n = int(prob * length / span + eps)
        if n * span > length:
            n = length // span
        n = min(n, max(length - span + 1, 0))
        if n == 0:
            continue
        n_starts = length - span + 1
        for k in range(n_codebooks):
            starts = torch.randperm(n_starts, generator=generator)[:n]
            idx = (starts[:, None] + offsets[None, :]).reshape(-1)
            out[b, k, idx] = True
    return out


def _make_bart(cfg: EnClapCfg):
    from transformers import BartConfig, BartForConditionalGeneration

    if cfg.bart_config is not None:
        return BartForConditionalGeneration(BartConfig(**cfg.bart_config))
    return BartForConditionalGeneration.from_pretrained(cfg.bart_name)


@functools.cache
def _bidirectional_mask_fn():
    """transformers 5's mask builder, or None on 4.x (resolved once, not per forward)."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x
        return None
    return create_bidirectional_mask


def _encoder_mask(enc, h: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
    """The BART encoder's attention mask for ``attn`` (B, L) in the form its layers take, and the extra layer
    arguments, on transformers 5 and on 4.x (installed beside aac-metrics, whose msclap needs transformers < 5)."""
    build = _bidirectional_mask_fn()
    if build is None:
        return enc._update_full_mask(attn, h), {"layer_head_mask": None}
    return build(config=enc.config, inputs_embeds=h, attention_mask=attn), {}


class EnClapCaptioner(nn.Module):
    """EnCLAP: BART whose encoder reads summed per-codebook EnCodec embeddings and a projected CLAP vector."""

    def __init__(self, cfg: EnClapCfg, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.bart = _make_bart(cfg)
        bc = self.bart.config
        d = bc.d_model
        self.codec_pad_id = cfg.codebook_size  # also the MCM mask id, as in EnCLAP
        table = math.ceil((cfg.codebook_size + 1) / 64) * 64
        self.codec_embed = nn.ModuleList(
            nn.Embedding(table, d, padding_idx=self.codec_pad_id) for _ in range(cfg.n_codebooks)
        )
        self.clap_projection = nn.Linear(cfg.clap_dim, d)
        self.mcm_heads = nn.ModuleList(nn.Linear(d, cfg.codebook_size) for _ in range(cfg.n_codebooks))
        std = getattr(bc, "init_std", 0.02)
        for m in list(self.codec_embed) + list(self.mcm_heads) + [self.clap_projection]:
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            else:
                with torch.no_grad():
                    m.weight[self.codec_pad_id].zero_()
        self.max_frames = bc.max_position_embeddings - 3
        if tokenizer is None and cfg.bart_config is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name or cfg.bart_name)
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _lengths(token_mask: torch.Tensor) -> torch.Tensor:
        token_mask = token_mask.bool()
        lengths = token_mask.sum(-1)
        T = token_mask.shape[-1]
        prefix = torch.arange(T, device=token_mask.device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, token_mask):
            raise ValueError("token_mask must be right-padded (ones first, then zeros)")
        return lengths

    def _check(self, tokens, token_mask):
        if tokens.dim() != 3 or tokens.shape[1] != self.cfg.n_codebooks:
            raise ValueError(f"tokens must be (B, {self.cfg.n_codebooks}, T), got {tuple(tokens.shape)}")
        if token_mask is None:
            token_mask = torch.ones(tokens.shape[0], tokens.shape[2], dtype=torch.bool, device=tokens.device)
        if tokens.shape[2] > self.max_frames:  # EnCLAP evaluation truncates from the start
            tokens, token_mask = tokens[..., : self.max_frames], token_mask[..., : self.max_frames]
        return tokens, token_mask

    def embed(self, tokens: torch.Tensor, token_mask: torch.Tensor, clap: torch.Tensor):
        """Encoder input embeddings (B, T+3, d) without positions, attention mask (B, T+3), codec mask."""
        bc = self.bart.config
        B, _, T = tokens.shape
        lengths = self._lengths(token_mask)
        S = T + 3
        pos = torch.arange(S, device=tokens.device)[None, :]
        codec_pos = (pos >= 2) & (pos < 2 + lengths[:, None])
        attn = pos < 3 + lengths[:, None]
        bart_ids = torch.full((B, S), bc.pad_token_id, dtype=torch.long, device=tokens.device)
        bart_ids[:, :2] = bc.bos_token_id
        bart_ids[pos.expand(B, -1) == 2 + lengths[:, None]] = bc.eos_token_id
        codes = F.pad(tokens, (2, 1), value=self.codec_pad_id)  # (B, K, S)
        codes = torch.where(codec_pos[:, None, :], codes, torch.full_like(codes, self.codec_pad_id))
        codec = sum(emb(codes[:, k]) for k, emb in enumerate(self.codec_embed))
        text = self.bart.get_input_embeddings()(bart_ids)
        x = torch.where(codec_pos[..., None], codec, text)
        x = torch.cat([self.clap_projection(clap.to(x.dtype))[:, None, :], x[:, 1:]], dim=1)
        return x, attn.long(), codec_pos

    def encode(self, tokens, token_mask, clap, mcm_mask: torch.Tensor | None = None):
        """Encoder last hidden state (B, T+3, d) and attention mask; ``mcm_mask`` (B, K, T) codes -> mask id."""
        tokens, token_mask = self._check(tokens, token_mask)
        if mcm_mask is not None:
            tokens = tokens.masked_fill(mcm_mask[..., : tokens.shape[-1]].to(tokens.device), self.codec_pad_id)
        x, attn, _ = self.embed(tokens, token_mask, clap)
        enc = self.bart.get_encoder()
        pos = enc.embed_positions(x[:, :, -1])
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos[:, :-1]], dim=1)
        h = enc.layernorm_embedding(x + pos)
        h = F.dropout(h, p=enc.dropout, training=self.training)
        mask, extra = _encoder_mask(enc, h, attn)
        for layer in enc.layers:
            if self.training and enc.layerdrop > 0 and torch.rand(()) < enc.layerdrop:
                continue
            h = layer(h, mask, **extra)
            if isinstance(h, tuple):
                h = h[0]
        return h, attn

    # ------------------------------------------------------------------ losses
    def mcm_loss(self, hidden: torch.Tensor, tokens: torch.Tensor, mcm_mask: torch.Tensor) -> torch.Tensor:
        """Weighted MCM loss (unscaled) from encoder output ``hidden`` (B, T+3, d) at masked codes only."""
        T = tokens.shape[-1]
        frames = hidden[:, 2 : 2 + T]
        total = hidden.new_zeros(())
        for k, (head, w) in enumerate(zip(self.mcm_heads, self.cfg.codebook_weights())):
            sel = mcm_mask[:, k, :T]
            if not sel.any():  # EnCLAP would give NaN here (mean over no labels); contribute nothing instead
                continue
            logits = head(frames[sel])
            total = total + w * F.cross_entropy(logits.float(), tokens[:, k][sel])
        return total

    def caption_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            label_smoothing=self.cfg.label_smoothing,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None,
        clap: torch.Tensor,
        labels: torch.Tensor | None = None,
        mcm: bool | None = None,
        mcm_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Losses and logits.

        tokens (B, K, T) int codes, token_mask (B, T) right-padded, clap (B, clap_dim), labels (B, L) caption
        ids with -100 padding (BOS ... EOS, as BART's tokenizer gives). MCM is applied when ``mcm`` (default:
        ``self.training``) and ``mcm_prob > 0``; ``mcm_mask`` (B, K, T) overrides the random spans.
        """
        from transformers.models.bart.modeling_bart import shift_tokens_right

        tokens, token_mask = self._check(tokens, token_mask)
        if mcm is None:
            mcm = self.training
        if mcm_mask is None and mcm and self.cfg.mcm_prob > 0:
            lengths = self._lengths(token_mask)
            mcm_mask = span_mask(
                lengths.cpu(), self.cfg.n_codebooks, tokens.shape[-1], self.cfg.mcm_prob, self.cfg.mcm_span, generator
            ).to(tokens.device)
        if mcm_mask is not None:
            mcm_mask = mcm_mask[..., : tokens.shape[-1]].bool() & token_mask.bool()[:, None, :]
        hidden, attn = self.encode(tokens, token_mask, clap, mcm_mask=mcm_mask)

        mcm_loss = None
        if mcm_mask is not None:
            mcm_loss = self.cfg.mcm_loss_scale * self.mcm_loss(hidden, tokens, mcm_mask)

        logits = caption_loss = None
        if labels is not None:
            bc = self.bart.config
            dec_in = shift_tokens_right(labels, bc.pad_token_id, bc.decoder_start_token_id)
            out = self.bart(encoder_outputs=(hidden,), attention_mask=attn, decoder_input_ids=dec_in, use_cache=False)
            logits = out.logits
            caption_loss = self.caption_loss(logits, labels)

        parts = [x for x in (caption_loss, mcm_loss) if x is not None]
        loss = sum(parts) if parts else None
        return {"loss": loss, "caption_loss": caption_loss, "mcm_loss": mcm_loss, "logits": logits}

    # ------------------------------------------------------------------ text
    def tokenize_captions(self, captions: list[str], max_length: int = 1024) -> torch.Tensor:
        """Caption label ids (B, L) padded with -100, as EnCLAP's ``tokenizer(text_target=...)``."""
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    @torch.no_grad()
    def generate_ids(
        self,
        tokens,
        token_mask,
        clap,
        num_beams: int | None = None,
        no_repeat_ngram_size: int | None = None,
        max_length: int | None = None,
    ) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        bc = self.bart.config
        was_training = self.training
        self.eval()
        try:
            hidden, attn = self.encode(tokens, token_mask, clap)
            return self.bart.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                attention_mask=attn,
                num_beams=num_beams or self.cfg.num_beams,
                no_repeat_ngram_size=(
                    self.cfg.no_repeat_ngram_size if no_repeat_ngram_size is None else no_repeat_ngram_size
                ),
                max_length=max_length or self.cfg.max_length,
                early_stopping=True,
                decoder_start_token_id=bc.decoder_start_token_id,
                forced_bos_token_id=bc.bos_token_id,
                forced_eos_token_id=bc.eos_token_id,
                bos_token_id=bc.bos_token_id,
                eos_token_id=bc.eos_token_id,
                pad_token_id=bc.pad_token_id,
            )
        finally:
            self.train(was_training)

    def generate(
        self, tokens, token_mask, clap, num_beams=None, no_repeat_ngram_size=None, max_length=None
    ) -> list[str]:
        """Beam-search captions (EnCLAP inference.py settings by default)."""
        if self.tokenizer is None:
            raise RuntimeError("EnClapCaptioner.generate needs a tokenizer")
        ids = self.generate_ids(tokens, token_mask, clap, num_beams, no_repeat_ngram_size, max_length)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [t.strip() for t in texts]

    # ------------------------------------------------------------------ io
    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.cfg)
        cfg["bart_config"] = self.bart.config.to_dict()  # reload needs no download
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_model(self, str(path / WEIGHTS_NAME))  # handles BART's tied embeddings
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> EnClapCaptioner:
        from safetensors.torch import load_model

        path = Path(path)
        raw = json.loads((path / CONFIG_NAME).read_text())
        known = set(EnClapCfg.__dataclass_fields__)
        cfg = EnClapCfg(**{k: v for k, v in raw.items() if k in known})
        tokenizer = None
        if (path / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = cls(cfg, tokenizer=tokenizer)
        load_model(model, str(path / WEIGHTS_NAME), device=str(map_location))
        return model


__all__ = ["EnClapCaptioner", "EnClapCfg", "span_mask"]
