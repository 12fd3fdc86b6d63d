"""Loading models: this suite's folders, the official M2D / M2D-CLAP files, registered pretrained names.

Formats read by :func:`load`:
  * a folder written by :func:`save_pretrained` (``config.json`` + ``model.safetensors`` [+ ``text_encoder/``]);
  * official 2024 files (flat ``model`` dict: encoder, target, decoder, ``audio_proj.0/2``, ``logit_scale``);
  * official 2025 files (``backbone.*`` = encoder + ``audio_proj.sem_*`` + ``norm_stats``, ``text_encoder.*``);
  * encoder-only files (``*_enconly``) and EVAR fine-tuned files (``module.ar.runtime.backbone.*``);
  * a registered pretrained name (``m2dclap.list_pretrained()``).
Official files are read with ``torch.load(weights_only=True)`` and a minimal allow-list, never by
unrestricted unpickling. Their configuration comes from the folder name, as the official loader does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .clap import quiet_transformers
from .config import TextCfg
from .model import M2DCLAP
from .official import build_model, load_official, official_layout, parse_official_name
from .saving import CheckpointError, load_strict, read_model_config, save_pretrained

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "load", "official_layout", "parse_official_name", "read_model_config", "save_pretrained"]


def _load_ours(
    folder: Path, device: str | torch.device, audio_only: bool = False, text_name: str | None = None
) -> M2DCLAP:
    from safetensors import safe_open

    cfg = read_model_config(folder / "config.json")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing")
    skip = ("text_encoder.", "text_proj.") if audio_only else ()  # audio-only never reads the text weights
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(skip)}
    except Exception as e:  # safetensors raises its own error types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{weights}: not a readable safetensors file (truncated or another kind of file: {reason})"
        ) from None
    text_src = folder / "text_encoder"
    if audio_only:
        cfg.text = TextCfg(kind="none")
    # The saved tokenizer/config come first; text_name stands in when the folder has none.
    source = str(text_src) if text_src.is_dir() else text_name
    model = build_model(cfg, weights, pretrained_text=False, text_source=source)
    load_strict(model, state, weights)
    return model.to(device).eval()


def load(
    path_or_name: str | Path,
    device: str | torch.device = "cpu",
    text_name: str | None = None,
    input_size: tuple[int, int] | None = None,
    download: bool = True,
    audio_only: bool = False,
) -> M2DCLAP:
    """Load a model from a saved folder, an official checkpoint file, or a registered pretrained name.

    Args:
        path_or_name: folder, ``.pth`` file, or a name from ``m2dclap.list_pretrained()``.
        device: where to put the model.
        text_name: replace the text model (hub name or local folder) named by an official checkpoint,
            e.g. a local copy of ``bert-base-uncased``; for a saved folder without ``text_encoder/``, where
            its tokenizer and config are read from. Ignored with ``audio_only``.
        input_size: (mels, frames) when an official file's folder name was changed.
        download: allow downloading a registered name's release zip into the cache.
        audio_only: skip the text tower: no text model is looked up, loaded or downloaded, so this works
            offline whatever text model the checkpoint names; ``encode_text`` is unavailable.

    Raises:
        CheckpointError: a missing, unreadable or wrong kind of file, a bad ``config.json`` field, or a text
            model that cannot be loaded (one line naming the file and the problem).
    """
    from .pretrained import list_pretrained, resolve

    quiet_transformers()
    input_size = _checked_input_size(input_size)
    if text_name is not None and (not isinstance(text_name, (str, Path)) or not str(text_name).strip()):
        raise CheckpointError(f"text_name={text_name!r}: expected a hub name or a local folder")
    text_name = str(text_name) if text_name is not None else None
    p = Path(path_or_name)
    if p.is_dir():
        if (p / "config.json").exists():
            return _load_ours(p, device, audio_only, text_name)
        from .pretrained import find_checkpoint_file

        found = find_checkpoint_file(p)
        if found is None:
            raise CheckpointError(
                f"{p}: folder holds neither config.json (this suite's format) nor one official checkpoint-N.pth file"
            )
        p = found
    elif not p.exists():
        if str(path_or_name) in list_pretrained():
            try:
                p = resolve(str(path_or_name), download=download)
            except FileNotFoundError as e:  # not cached and not downloadable: a CheckpointError for the CLIs
                raise CheckpointError(str(e)) from None
        else:
            raise CheckpointError(
                f"{path_or_name}: no such file or folder, and not a registered pretrained "
                f"name (known: {', '.join(list_pretrained())})"
            )
    if p.suffix == ".safetensors":
        if (p.parent / "config.json").exists():
            return _load_ours(p.parent, device, audio_only, text_name)
        raise CheckpointError(f"{p}: a bare safetensors file needs its config.json beside it")
    return load_official(p, device, text_name, input_size, audio_only)


def _checked_input_size(size: Any) -> tuple[int, int] | None:
    if size is None or (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        return None if size is None else (size[0], size[1])
    raise CheckpointError(f"input_size={size!r}: expected (mel bins, frames), two positive integers")
