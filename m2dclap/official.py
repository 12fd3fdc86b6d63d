"""The official M2D / M2D-CLAP checkpoint files: their key layouts, the configuration read from the folder
name and the tensors, and loading them into :class:`m2dclap.M2DCLAP`.

Layouts: 2024 files (flat ``model`` dict: encoder, target, decoder, ``audio_proj.0/2``, ``logit_scale``);
2025 files (``backbone.*`` = encoder + ``audio_proj.sem_*`` + ``norm_stats``, ``text_encoder.*``);
encoder-only files (``*_enconly``) and EVAR fine-tuned files (``module.ar.runtime.backbone.*``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from .clap import TextModelError, from_pretrained_local_first, text_model_errors
from .config import ConfigError, EncoderCfg, FrontendCfg, ModelCfg, ProjectorCfg, TextCfg
from .model import M2DCLAP
from .saving import CheckpointError, load_strict, safe_torch_load

log = logging.getLogger(__name__)

DEFAULT_NORM_STATS = (-7.1, 4.2)  # official default for checkpoints without norm_stats (2022-2024 models)

# Official text towers by the letter after ``p16kp`` in the folder name.
OFFICIAL_TEXT = {
    "A": TextCfg(kind="hf", name="thenlper/gte-base", pooling="mean", width=768, max_length=512),
    "B": TextCfg(kind="hf", name="google-bert/bert-base-uncased", pooling="cls", width=768, max_length=512),
    "N": TextCfg(
        kind="sentence", name="nvidia/NV-Embed-v2", pooling="mean", width=4096, max_length=32768, add_eos=True
    ),
}


def build_model(cfg: ModelCfg, where: Path, **kwargs: Any) -> M2DCLAP:
    """``M2DCLAP(cfg)``, with a text model that cannot be loaded reported against the checkpoint ``where``."""
    try:
        return M2DCLAP(cfg, **kwargs)
    except TextModelError as e:
        raise CheckpointError.text_model_failed(where, e) from None


def parse_official_name(name: str) -> dict[str, Any] | None:
    """``m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025`` -> input (80, 1001), patch (16, 16), sr '16k',
    extra ['B', 'TI'], model class 'm2d_clap_vit_base'. None when the name does not follow the pattern."""
    parts = name.split("-")
    if len(parts) < 2:
        return None
    fields = parts[1].split("p")
    m_in = re.fullmatch(r"(\d+)x(\d+)", fields[0])
    m_patch = re.fullmatch(r"(\d+)x(\d+)", fields[1]) if len(fields) > 1 else None
    if not (m_in and m_patch):
        return None
    sr = fields[2] if len(fields) > 2 else "16k"
    if sr not in ("16k", "32k"):
        return None
    return {
        "model": parts[0],
        "input_size": (int(m_in[1]), int(m_in[2])),
        "patch_size": (int(m_patch[1]), int(m_patch[2])),
        "sr": sr,
        "extra": fields[3:],
    }


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def official_layout(sd: dict[str, Any]) -> str:
    """Name the key layout of an official state dict: '2025', 'evar', 'clap2024', 'm2d' or 'encoder'."""
    if any(k.startswith("backbone.") for k in sd):
        return "2025"
    if any(k.startswith("module.ar.runtime.backbone.") for k in sd):
        return "evar"
    if "patch_embed.proj.weight" not in sd:
        return "unknown"
    if any(k.startswith("audio_proj.") or k == "logit_scale" for k in sd):
        return "clap2024"
    if any(k.startswith(("target_blocks.", "decoder_")) for k in sd):
        return "m2d"
    return "encoder"


def load_official(
    path: Path,
    device: str | torch.device,
    text_name: str | None,
    input_size: tuple[int, int] | None,
    audio_only: bool = False,
) -> M2DCLAP:
    sd = _state_dict_of(safe_torch_load(path), path)
    layout = official_layout(sd)
    if layout == "unknown":
        raise CheckpointError(
            f"{path}: not an M2D checkpoint: no 'patch_embed.proj.weight' or 'backbone.*' "
            f"keys (first keys: {list(sd)[:5]})"
        )
    text_sd = _strip(sd, "text_encoder.") if layout == "2025" else {}
    if layout == "2025":
        sd = _strip(sd, "backbone.")
    elif layout == "evar":
        sd = _strip(sd, "module.ar.runtime.backbone.")
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"{path}: layout {layout!r} but no encoder weights (patch_embed.proj.weight)")
    _check_encoder_tensors(sd, path)

    # Audio-only never looks at the text model, not even for its width: it may not be reachable.
    cfg = _official_config(path, sd, input_size, None if audio_only else text_name)
    if audio_only:
        cfg.text, text_sd = TextCfg(kind="none"), {}
        sd = {k: v for k, v in sd.items() if not k.startswith("text_proj.")}
    log.info("%s: official %s layout, config %s", path, layout, cfg)
    model = build_model(cfg, path, pretrained_text=not text_sd)
    state, encoder_keys = {}, set(model.encoder.state_dict())
    for k, v in sd.items():
        if k in encoder_keys:
            state["encoder." + k] = v
        elif k.startswith("audio_proj.") or k.startswith("text_proj.") or k in ("norm_stats", "logit_scale"):
            state[k] = v
    if "norm_stats" not in state:
        log.warning("%s has no norm_stats: using the official default %s", path, DEFAULT_NORM_STATS)
        state["norm_stats"] = torch.tensor(DEFAULT_NORM_STATS)
    if "logit_scale" not in state:
        state["logit_scale"] = model.logit_scale.detach().clone()
    if model.text_encoder is not None and hasattr(model.text_encoder, "text_encoder"):
        if text_sd:
            own = model.text_encoder.state_dict()
            # Older transformers saved BERT's position_ids buffer and the pooler (unused by CLS pooling).
            text_sd = {k: v for k, v in text_sd.items() if k in own}
            state.update({"text_encoder." + k: v for k, v in text_sd.items()})
        else:
            state.update({"text_encoder." + k: v for k, v in model.text_encoder.state_dict().items()})
    if "pos_embed" in sd and cfg.encoder.grid_size[1] * cfg.encoder.grid_size[0] + 1 != sd["pos_embed"].shape[1]:
        raise CheckpointError(
            f"{path}: pos_embed has {sd['pos_embed'].shape[1]} tokens but the input size "
            f"{cfg.encoder.input_size} gives {cfg.encoder.grid_size}; pass input_size="
        )
    load_strict(model, state, path)
    return model.to(device).eval()


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model state dict inside an official file (``{'model': sd, ...}`` or a bare state dict)."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: not an M2D checkpoint: it holds a {type(obj).__name__}, not a dictionary of weights"
        )
    if {"state", "param_groups"} <= set(obj):
        raise CheckpointError(f"{path}: not an M2D checkpoint: it is an optimizer state (state, param_groups)")
    sd = obj.get("model", obj)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not an M2D checkpoint: its 'model' entry is a {type(sd).__name__}")
    others = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if others:
        where = "its 'model' entry" if "model" in obj else "it"
        raise CheckpointError(
            f"{path}: not an M2D checkpoint: {where} is not a state dict of tensors "
            f"(non-tensor entries: {[str(k) for k in others[:5]]})"
        )
    return sd


def _check_encoder_tensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    """The encoder tensors the configuration is read from, with the shapes it assumes."""
    need = {"patch_embed.proj.weight": 4, "pos_embed": 3}
    for key, ndim in need.items():
        if key not in sd:
            raise CheckpointError(f"{path}: not a usable M2D checkpoint: missing key {key!r}")
        if sd[key].dim() != ndim:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(sd[key].shape)}; an M2D encoder's has {ndim} dimensions"
            )
    if not any(re.fullmatch(r"blocks\.\d+\..+", k) for k in sd):
        raise CheckpointError(f"{path}: not a usable M2D checkpoint: no transformer blocks (blocks.N.*)")
    if "norm_stats" in sd and tuple(sd["norm_stats"].shape) != (2,):
        raise CheckpointError(f"{path}: norm_stats has shape {tuple(sd['norm_stats'].shape)}, expected (2,)")
    if "audio_proj.sem_token" in sd and "audio_proj.sem_blocks.0.mlp.fc1.weight" not in sd:
        raise CheckpointError(f"{path}: audio_proj.sem_token without its blocks (audio_proj.sem_blocks.0.*)")


def _official_config(
    path: Path, sd: dict[str, torch.Tensor], input_size: tuple[int, int] | None, text_name: str | None
) -> ModelCfg:
    parsed = parse_official_name(path.parent.name) or parse_official_name(path.stem)
    w = sd["patch_embed.proj.weight"]  # (D, 1, pf, pt)
    D, patch = w.shape[0], (w.shape[2], w.shape[3])
    depth = 1 + max(int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    n_tokens = sd["pos_embed"].shape[1] - 1
    sr = parsed["sr"] if parsed else "16k"
    frontend = FrontendCfg.p32k() if sr == "32k" else FrontendCfg.p16k()
    if input_size is None and parsed:
        input_size = parsed["input_size"]
    if input_size is None:  # renamed folder: infer from the position embedding (exact up to the conv floor)
        gf = frontend.n_mels // patch[0]
        input_size = (frontend.n_mels, n_tokens // gf * patch[1])
        log.warning("%s: folder name gives no configuration; inferred input size %s", path, input_size)
    if "norm_stats" in sd:
        frontend.norm_stats = tuple(float(x) for x in sd["norm_stats"])
    encoder = EncoderCfg(
        input_size=tuple(input_size), patch_size=patch, embed_dim=D, depth=depth, num_heads=max(D // 64, 1)
    )  # all released ViTs use 64-dim heads
    if "audio_proj.sem_token" in sd:
        sem_depth = 1 + max(int(m[1]) for k in sd if (m := re.match(r"audio_proj\.sem_blocks\.(\d+)\.", k)))
        ratio = sd["audio_proj.sem_blocks.0.mlp.fc1.weight"].shape[0] / D
        projector = ProjectorCfg(kind="transformer", depth=sem_depth, num_heads=1, mlp_ratio=ratio)
    elif "audio_proj.0.weight" in sd:
        projector = ProjectorCfg(kind="mlp")
    else:
        projector = ProjectorCfg(kind="none")
    if "text_proj.2.weight" in sd:
        raise CheckpointError(f"{path}: an MLP text projector (text_proj.2.*) is not supported")
    extra = parsed["extra"] if parsed else []
    is_clap = projector.kind != "none" or "text_proj.weight" in sd
    if not is_clap:
        text = TextCfg(kind="none")
    else:
        letter = extra[0] if extra else "A"  # 2024 CLAP names carry no letter: GTE-base
        if letter not in OFFICIAL_TEXT:
            raise CheckpointError(f"{path}: unknown text encoder code {letter!r} in the folder name")
        text = TextCfg(**vars(OFFICIAL_TEXT[letter]))
        if "text_proj.weight" in sd:
            text.width = sd["text_proj.weight"].shape[1]
    if text_name and text.kind != "none":
        text.name = text_name
        if text.kind == "hf" and "text_proj.weight" not in sd:  # the replacement sets the text width
            from transformers import AutoConfig

            from .clap import resolve_text_model

            source = resolve_text_model(text_name)
            try:
                with text_model_errors(text_name, source):
                    text.width = from_pretrained_local_first(AutoConfig, source).hidden_size
            except TextModelError as e:
                raise CheckpointError.text_model_failed(path, e) from None
    cfg = ModelCfg(
        name=parsed["model"] if parsed else path.stem,
        frontend=frontend,
        encoder=encoder,
        projector=projector,
        text=text,
    )
    try:
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(
            f"{path}: the configuration read from the file and its folder name is not usable: {e}"
        ) from None
