"""Fetching what the metrics need on an online machine: the CoreNLP 3.6.0 jars for SPICE and the FENSE models.

Files come through ``torch.hub.download_url_to_file`` (a progress bar, the sha256 check where the publisher
gives one, a temporary file moved into place only when complete) rather than a hand-written urllib loop;
the Hugging Face models through their own ``from_pretrained`` caches.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from . import coco
from .errors import DOWNLOAD_COMMAND, MetricUnavailableError
from .fense import DEFAULT_ECHECKER, ECHECKERS, SBERT_MODEL, fense_dir, sha256_of

log = logging.getLogger(__name__)


def fetch(url: str, target: Path, sha256: str | None = None) -> Path:
    """``url`` -> ``target`` with a progress bar; a partial or (when ``sha256`` is given) wrong file never
    lands at ``target``. Any failure is a MetricUnavailableError naming the URL."""
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256, progress=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch.hub's hash mismatch
        raise MetricUnavailableError(f"could not download {url}: {exc}") from exc
    return target


def _spice_download_url() -> str:
    """The CoreNLP zip URL, read from the installed pycocoevalcap's get_stanford_models script."""
    from pycocoevalcap.spice import get_stanford_models as gsm

    src = inspect.getsource(gsm)
    m = re.search(r"url\s*=\s*['\"]([^'\"]+)['\"]\s*\.format\(\s*CORENLP\s*\)", src)
    if not m:
        raise RuntimeError("could not read the CoreNLP URL from pycocoevalcap.spice.get_stanford_models")
    return m.group(1).format(gsm.CORENLP)


def download_spice_models(directory: str | os.PathLike | None = None, url: str | None = None) -> list[Path]:
    """Download Stanford CoreNLP 3.6.0 (~390 MB zip; no published hash) and install its two jars into
    ``<spice dir>/lib``. ``url``: another location of the same zip (default: pycocoevalcap's)."""
    from pycocoevalcap.spice import get_stanford_models as gsm

    d = Path(directory) if directory is not None else coco.spice_dir()
    lib = d / "lib"
    targets = [lib / name for name in coco.CORENLP_JARS]
    if all(p.is_file() for p in targets):
        log.info("CoreNLP jars already present in %s", lib)
        return targets
    url = url or _spice_download_url()
    with tempfile.TemporaryDirectory(prefix="corenlp_", dir=lib.parent if lib.parent.is_dir() else None) as tmp:
        try:
            zip_path = fetch(url, Path(tmp) / "corenlp.zip")
        except MetricUnavailableError as exc:
            raise MetricUnavailableError(
                f"{exc}. Run `{DOWNLOAD_COMMAND}` on a machine with internet access, "
                f"or copy {', '.join(coco.CORENLP_JARS)} into {lib} by hand"
            ) from exc.__cause__
        lib.mkdir(parents=True, exist_ok=True)
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for name, target in zip(coco.CORENLP_JARS, targets):
                    with zf.open(f"{gsm.CORENLP}/{name}") as src, open(target.with_suffix(".part"), "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    target.with_suffix(".part").replace(target)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise MetricUnavailableError(f"{url}: not the CoreNLP {gsm.CORENLP} zip ({exc})") from exc
    log.info("installed %s", ", ".join(str(t) for t in targets))
    return targets


def download_fense_models(echecker: str = DEFAULT_ECHECKER, sbert: str = SBERT_MODEL) -> list[str]:
    """Fetch the echecker (sha256-checked) into :func:`~captioning.metrics.fense.fense_dir`, and the SBERT model
    and the echecker's BERT tokenizer/config into the Hugging Face cache."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig, AutoTokenizer

    url, sha = ECHECKERS[echecker]
    target = fense_dir() / Path(url).name
    if not (target.is_file() and sha256_of(target) == sha):
        fetch(url, target, sha)
    states = torch.load(target, map_location="cpu", weights_only=True)
    try:
        for loader in (AutoConfig, AutoTokenizer):
            loader.from_pretrained(states["model_type"])
        SentenceTransformer(sbert)
    except OSError as exc:
        raise MetricUnavailableError(f"could not fetch the FENSE text models from the Hugging Face hub: {exc}") from exc
    return [str(target), states["model_type"], sbert]
