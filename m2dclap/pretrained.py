"""Registry of officially released weights (separate from the architecture presets).

Official weights ship as zip files attached to GitHub releases of nttcslab/m2d. ``resolve`` finds a
checkpoint in the local cache (``$M2DCLAP_CACHE`` or ``~/.cache/m2dclap``) and, with network access,
downloads and unpacks it there first. The folder name is kept: the official loader reads the
configuration from it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RELEASES = "https://github.com/nttcslab/m2d/releases/download"


@dataclass(frozen=True)
class PretrainedTag:
    release: str  # GitHub release tag the zip is attached to
    description: str  # what the weight is (paper naming)


_PRETRAINED: dict[str, PretrainedTag] = {
    "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025": PretrainedTag(
        "v0.5.0", "M2D-CLAP 2025 (paper's final model, BERT text encoder included)"
    ),
    "m2d_clap_vit_base-80x608p16x16-240128": PretrainedTag(
        "v0.1.0", "M2D-CLAP 2024 stage 1 (GTE-base text, MLP projector)"
    ),
    "m2d_clap_vit_base-80x1001p16x16-240128_AS-FT_enconly": PretrainedTag(
        "v0.3.0", "M2D-CLAP 2024 encoder fine-tuned on AudioSet-2M"
    ),
    "m2d_vit_base-80x608p16x16-221006-mr7": PretrainedTag("v0.1.0", "M2D ViT-B, mask ratio 0.7"),
    "m2d_vit_base-80x608p16x16-221006-mr7_enconly": PretrainedTag("v0.1.0", "M2D ViT-B encoder only"),
    "m2d_as_vit_base-80x608p16x16-240213": PretrainedTag("v0.1.0", "M2D-AS ViT-B"),
    "m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly": PretrainedTag("v0.3.0", "M2D-AS fine-tuned on AudioSet-2M"),
}


def list_pretrained() -> list[str]:
    """Names of the released official weights this suite knows."""
    return sorted(_PRETRAINED)


def cache_dir() -> Path:
    return Path(os.environ.get("M2DCLAP_CACHE", Path.home() / ".cache" / "m2dclap"))


def find_checkpoint_file(folder: Path) -> Path | None:
    """The checkpoint inside a release folder: the highest ``checkpoint-N.pth``, else the only ``.pth``."""
    files = sorted(folder.glob("*.pth"))
    numbered = [f for f in files if f.stem.startswith("checkpoint-") and f.stem[11:].isdigit()]
    if numbered:
        return max(numbered, key=lambda f: int(f.stem[11:]))
    return files[0] if len(files) == 1 else None


def resolve(name: str, download: bool = True) -> Path:
    """A registered name -> the local checkpoint file, downloading the release zip when allowed."""
    if name not in _PRETRAINED:
        raise KeyError(f"unknown pretrained weight {name!r}; known: {', '.join(list_pretrained())}")
    folder = cache_dir() / name
    found = find_checkpoint_file(folder) if folder.is_dir() else None
    if found:
        return found
    url = f"{RELEASES}/{_PRETRAINED[name].release}/{name}.zip"
    if not download:
        raise FileNotFoundError(
            f"{name} is not in the cache ({folder}); download {url} and unzip it into "
            f"{cache_dir()} (keep the folder name)"
        )
    try:
        _download_and_unzip(url, cache_dir())
    except (OSError, zipfile.BadZipFile) as e:  # no network, a full disk, or a damaged download
        raise FileNotFoundError(
            f"could not download and unpack {url} ({e}); on a machine with network access, "
            f"download it and unzip it into {cache_dir()} keeping the folder name {name}"
        ) from None
    found = find_checkpoint_file(folder)
    if found is None:
        raise FileNotFoundError(f"{url} unpacked, but {folder} holds no single checkpoint (.pth) file")
    return found


def _download_and_unzip(url: str, dest: Path) -> None:
    """``url`` (a release zip) unpacked into ``dest``; torch.hub's downloader gives the progress bar and never
    leaves a partial file (the releases publish no hashes, so none is checked)."""
    import torch.hub

    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=dest) as tmp:
        zip_path = Path(tmp) / "release.zip"
        torch.hub.download_url_to_file(url, str(zip_path), progress=True)
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():  # refuse paths escaping the cache folder
                target = (dest / member).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise OSError(f"unsafe path {member!r} in {url}")
            zf.extractall(dest)
