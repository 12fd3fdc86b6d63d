"""Saving and loading: this suite's format and the official M2D / M2D-CLAP checkpoint layouts.

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

import argparse
import json
import logging
import pathlib
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .clap import TextModelError, from_pretrained_local_first, quiet_transformers, text_model_errors
from .config import ConfigError, EncoderCfg, FrontendCfg, ModelCfg, ProjectorCfg, TextCfg
from .fileio import usual_permissions
from .model import M2DCLAP

log = logging.getLogger(__name__)

FORMAT = "m2dclap"
FORMAT_VERSION = 1
DEFAULT_NORM_STATS = (-7.1, 4.2)  # official default for checkpoints without norm_stats (2022-2024 models)

# Globals an official checkpoint may reference besides tensors: the argparse ``args`` and paths in it.
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]

# Official text towers by the letter after ``p16kp`` in the folder name.
OFFICIAL_TEXT = {
    "A": TextCfg(kind="hf", name="thenlper/gte-base", pooling="mean", width=768, max_length=512),
    "B": TextCfg(kind="hf", name="google-bert/bert-base-uncased", pooling="cls", width=768, max_length=512),
    "N": TextCfg(kind="sentence", name="nvidia/NV-Embed-v2", pooling="mean", width=4096, max_length=32768,
                 add_eos=True),
}


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file and the problem.

    ``text_model`` is the name of the text model when that is what could not be loaded (a CLI with an
    option for a local copy can add it to the message); None otherwise."""

    text_model: str | None = None

    def for_cli(self, option: str = "--text-model") -> str:
        """The message, plus the command's own option for a local text model when that is what failed."""
        return f"{self}; on this command: {option} PATH" if self.text_model else str(self)


def _text_model_failed(where: Path, e: TextModelError) -> CheckpointError:
    err = CheckpointError(f"{where}: {e}")
    err.text_model = e.model_name
    return err


# ---------------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------------
def save_pretrained(model: M2DCLAP, directory: str | Path, **metadata: Any) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ the text tokenizer/config) atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": model.cfg.to_dict(), **metadata}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, default=str))
        enc = model.text_encoder
        if enc is not None and hasattr(enc, "tokenizer"):
            enc.tokenizer.save_pretrained(tmp / "text_encoder")
            enc.text_encoder.config.save_pretrained(tmp / "text_encoder")
        usual_permissions(tmp)  # mkdtemp and safetensors make 0700/0600: respect the umask instead
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _load_ours(folder: Path, device: str | torch.device, audio_only: bool = False,
               text_name: str | None = None) -> M2DCLAP:
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
        raise CheckpointError(f"{weights}: not a readable safetensors file (truncated or another kind of "
                              f"file: {reason})") from None
    text_src = folder / "text_encoder"
    if audio_only:
        cfg.text = TextCfg(kind="none")
    # The saved tokenizer/config come first; text_name stands in when the folder has none.
    source = str(text_src) if text_src.is_dir() else text_name
    model = _build_model(cfg, weights, pretrained_text=False, text_source=source)
    _load_strict(model, state, weights)
    return model.to(device).eval()


def read_model_config(path: Path) -> ModelCfg:
    """The model config of a saved folder's ``config.json``, every field checked; errors name file and field."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: not an m2dclap model folder (format={found!r}, expected {FORMAT!r})")
    if "model" not in meta:
        raise CheckpointError(f"{path}: no 'model' section (the model config)")
    try:
        return ModelCfg.from_dict(meta["model"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _build_model(cfg: ModelCfg, where: Path, **kwargs: Any) -> M2DCLAP:
    """``M2DCLAP(cfg)``, with a text model that cannot be loaded reported against the checkpoint."""
    try:
        return M2DCLAP(cfg, **kwargs)
    except TextModelError as e:
        raise _text_model_failed(where, e) from None


def _load_strict(model: M2DCLAP, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not fit the model: missing {missing[:6]}"
                              f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                              f"{'...' if len(unexpected) > 6 else ''}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(expected[k].shape)}")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# Safe reading of official .pth files
# ---------------------------------------------------------------------------------------------------
def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` allowing only argparse.Namespace and paths besides tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    _check_torch_header(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # a damaged pickle stream, not a refused type
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (damaged or another kind of file: "
                                  f"{_weights_only_reason(e)})") from None
        raise CheckpointError(f"{path}: refused to load: it references {found.group(1)}, which is not a tensor "
                              "or an allowed type (argparse.Namespace, paths). The file is not a plain checkpoint "
                              "and may be tampered with; it was not unpickled.") from None
    except Exception as e:  # a damaged file can fail anywhere inside the unpickler (IndexError, KeyError...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def _check_torch_header(path: Path) -> None:
    """torch.save writes a zip archive (a pickle before torch 1.6); anything else is named as what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return
    if not head:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (empty file)")
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte little-endian header length, then JSON
        raise CheckpointError(f"{path}: a safetensors file, not a PyTorch checkpoint; give the folder holding "
                              "it with its config.json")
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (it is neither a zip archive nor a pickle; "
                          f"it starts with {head[:8]!r})")


def _weights_only_reason(e: Exception) -> str:
    """The unpickler's own complaint inside torch's long weights_only message."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


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
    return {"model": parts[0], "input_size": (int(m_in[1]), int(m_in[2])),
            "patch_size": (int(m_patch[1]), int(m_patch[2])), "sr": sr, "extra": fields[3:]}


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


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


def _load_official(path: Path, device: str | torch.device, text_name: str | None,
                   input_size: tuple[int, int] | None, audio_only: bool = False) -> M2DCLAP:
    sd = _state_dict_of(safe_torch_load(path), path)
    layout = official_layout(sd)
    if layout == "unknown":
        raise CheckpointError(f"{path}: not an M2D checkpoint: no 'patch_embed.proj.weight' or 'backbone.*' "
                              f"keys (first keys: {list(sd)[:5]})")
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
    model = _build_model(cfg, path, pretrained_text=not text_sd)
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
        raise CheckpointError(f"{path}: pos_embed has {sd['pos_embed'].shape[1]} tokens but the input size "
                              f"{cfg.encoder.input_size} gives {cfg.encoder.grid_size}; pass input_size=")
    _load_strict(model, state, path)
    return model.to(device).eval()


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model state dict inside an official file (``{'model': sd, ...}`` or a bare state dict)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not an M2D checkpoint: it holds a {type(obj).__name__}, "
                              "not a dictionary of weights")
    if {"state", "param_groups"} <= set(obj):
        raise CheckpointError(f"{path}: not an M2D checkpoint: it is an optimizer state (state, param_groups)")
    sd = obj.get("model", obj)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not an M2D checkpoint: its 'model' entry is a {type(sd).__name__}")
    others = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if others:
        where = "its 'model' entry" if "model" in obj else "it"
        raise CheckpointError(f"{path}: not an M2D checkpoint: {where} is not a state dict of tensors "
                              f"(non-tensor entries: {[str(k) for k in others[:5]]})")
    return sd


def _check_encoder_tensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    """The encoder tensors the configuration is read from, with the shapes it assumes."""
    need = {"patch_embed.proj.weight": 4, "pos_embed": 3}
    for key, ndim in need.items():
        if key not in sd:
            raise CheckpointError(f"{path}: not a usable M2D checkpoint: missing key {key!r}")
        if sd[key].dim() != ndim:
            raise CheckpointError(f"{path}: {key} has shape {tuple(sd[key].shape)}; an M2D encoder's has "
                                  f"{ndim} dimensions")
    if not any(re.fullmatch(r"blocks\.\d+\..+", k) for k in sd):
        raise CheckpointError(f"{path}: not a usable M2D checkpoint: no transformer blocks (blocks.N.*)")
    if "norm_stats" in sd and tuple(sd["norm_stats"].shape) != (2,):
        raise CheckpointError(f"{path}: norm_stats has shape {tuple(sd['norm_stats'].shape)}, expected (2,)")
    if "audio_proj.sem_token" in sd and "audio_proj.sem_blocks.0.mlp.fc1.weight" not in sd:
        raise CheckpointError(f"{path}: audio_proj.sem_token without its blocks (audio_proj.sem_blocks.0.*)")


def _official_config(path: Path, sd: dict[str, torch.Tensor], input_size: tuple[int, int] | None,
                     text_name: str | None) -> ModelCfg:
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
    encoder = EncoderCfg(input_size=tuple(input_size), patch_size=patch, embed_dim=D, depth=depth,
                         num_heads=max(D // 64, 1))  # all released ViTs use 64-dim heads
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
                raise _text_model_failed(path, e) from None
    cfg = ModelCfg(name=parsed["model"] if parsed else path.stem, frontend=frontend, encoder=encoder,
                   projector=projector, text=text)
    try:
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: the configuration read from the file and its folder name is not "
                              f"usable: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------
def load(path_or_name: str | Path, device: str | torch.device = "cpu", text_name: str | None = None,
         input_size: tuple[int, int] | None = None, download: bool = True, audio_only: bool = False) -> M2DCLAP:
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
            raise CheckpointError(f"{p}: folder holds neither config.json (this suite's format) nor one "
                                  "official checkpoint-N.pth file")
        p = found
    elif not p.exists():
        if str(path_or_name) in list_pretrained():
            try:
                p = resolve(str(path_or_name), download=download)
            except FileNotFoundError as e:  # not cached and not downloadable: a CheckpointError for the CLIs
                raise CheckpointError(str(e)) from None
        else:
            raise CheckpointError(f"{path_or_name}: no such file or folder, and not a registered pretrained "
                                  f"name (known: {', '.join(list_pretrained())})")
    if p.suffix == ".safetensors":
        if (p.parent / "config.json").exists():
            return _load_ours(p.parent, device, audio_only, text_name)
        raise CheckpointError(f"{p}: a bare safetensors file needs its config.json beside it")
    return _load_official(p, device, text_name, input_size, audio_only)


def _checked_input_size(size: Any) -> tuple[int, int] | None:
    if size is None or (isinstance(size, (list, tuple)) and len(size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        return None if size is None else (size[0], size[1])
    raise CheckpointError(f"input_size={size!r}: expected (mel bins, frames), two positive integers")
