"""Atomic file writing shared by every tool of the suite: a killed job never leaves a half-written file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything under it) the permissions a plain ``open``/``mkdir`` gives:
    0666/0777 less the umask. ``mkstemp``/``mkdtemp`` and safetensors' ``save_file`` make private (0600/0700)
    files and folders, which other users of a shared model folder could not read."""
    path, mask = Path(path), _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success give it the usual permissions and rename it over
    ``path``; on failure remove it. Text mode writes UTF-8 with no newline translation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8"})) as f:
            yield f
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file in the same folder, then rename it over ``path``."""
    with atomic_write(path, "w") as f:
        f.write(text)
