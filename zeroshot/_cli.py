"""What the zero-shot entry points share: logging next to progress bars, model loading, error reporting."""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

import torch

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency
    tqdm = None


class _TqdmHandler(logging.StreamHandler):
    """Log records written through tqdm, so they do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if tqdm is not None:
                tqdm.write(msg, file=self.stream)
            else:
                self.stream.write(msg + "\n")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def cli_error(prog: str, msg: str) -> int:
    """Print ``prog: error: msg`` on stderr and return the usage/data error exit code 2."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def cli_logging(quiet: bool) -> Iterator[None]:
    """INFO (or WARNING with ``quiet``) messages of ``zeroshot`` and ``m2dclap`` on stderr while a CLI runs."""
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    loggers = [logging.getLogger("zeroshot"), logging.getLogger("m2dclap")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old):
            lg.removeHandler(handler)
            lg.setLevel(level)


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA device is available")
    return device


def load_model(checkpoint: str, device: str, text_model: str | None = None):
    """``m2dclap.load`` with the text tower (zero-shot needs it), moved to ``device``, in eval mode;
    ``text_model``: a local copy (or another hub name) of the checkpoint's text model."""
    import m2dclap

    model = m2dclap.load(checkpoint, audio_only=False, text_name=text_model)
    return model.to(device).eval()


def add_text_model_option(p) -> None:
    p.add_argument("--text-model", metavar="PATH", help="local folder (or hub name) of the checkpoint's text "
                   "model, e.g. a copy of bert-base-uncased for an official 2025 checkpoint offline")
