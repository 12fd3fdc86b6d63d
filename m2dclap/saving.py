"""The file side of checkpoints: this suite's folder format and safe reading of ``.pth`` files.

Nothing here builds a model, so :mod:`m2dclap.model` can import it (``M2DCLAP.save_pretrained``) without
an import cycle; :mod:`m2dclap.checkpoint` (our folders) and :mod:`m2dclap.official` (official files) build
models on top of it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clap import TextModelError
from .config import ConfigError, ModelCfg
from .fileio import usual_permissions

FORMAT = "m2dclap"
FORMAT_VERSION = 1

# Globals an official checkpoint may reference besides tensors: the argparse ``args`` and paths in it.
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file and the problem.

    ``text_model`` is the name of the text model when that is what could not be loaded (a CLI with an
    option for a local copy can add it to the message); None otherwise."""

    text_model: str | None = None

    def for_cli(self, option: str = "--text-model") -> str:
        """The message, plus the command's own option for a local text model when that is what failed."""
        return f"{self}; on this command: {option} PATH" if self.text_model else str(self)

    @classmethod
    def text_model_failed(cls, where: Path, e: TextModelError) -> "CheckpointError":
        """The error for a text model that could not be loaded while reading ``where``."""
        err = cls(f"{where}: {e}")
        err.text_model = e.model_name
        return err


def save_pretrained(model: nn.Module, directory: str | Path, **metadata: Any) -> Path:
    """Write ``model`` (an :class:`m2dclap.M2DCLAP`) as ``config.json`` + ``model.safetensors`` (+ the text
    tokenizer/config), atomically."""
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


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load ``state`` into ``model``; missing, unexpected or misshapen keys are a CheckpointError naming ``where``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not fit the model: missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''}"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(state)


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
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (damaged or another kind of file: {_weights_only_reason(e)})"
            ) from None
        raise CheckpointError(
            f"{path}: refused to load: it references {found.group(1)}, which is not a tensor "
            "or an allowed type (argparse.Namespace, paths). The file is not a plain checkpoint "
            "and may be tampered with; it was not unpickled."
        ) from None
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
        raise CheckpointError(
            f"{path}: a safetensors file, not a PyTorch checkpoint; give the folder holding it with its config.json"
        )
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint (it is neither a zip archive nor a pickle; it starts with {head[:8]!r})"
    )


def _weights_only_reason(e: Exception) -> str:
    """The unpickler's own complaint inside torch's long weights_only message."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
