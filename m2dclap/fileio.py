"""File writing and reading shared by every tool of the suite: atomic writes (a killed job never leaves a
half-written file) with the usual permissions, and a CSV reader whose every error names the file and the line."""

from __future__ import annotations

import contextlib
import csv
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


# ----------------------------------------------------------------------------------------------- reading CSV


class TextFileError(ValueError):
    """A text file that cannot be read as such; the message names the file and the line."""


class UndecodableError(TextFileError):
    """Bytes that are not text in the expected encoding; the message names the file, the line and the bytes."""


def undecodable_line(path: str | Path, encoding: str = "utf-8-sig") -> str | None:
    """Where ``path`` stops being ``encoding`` text ("FILE, line N: ..."), or None if it all decodes."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):  # a UTF-8 multi-byte character never contains b"\n"
            try:
                raw.decode(encoding if line == 1 else encoding.replace("-sig", ""))
            except UnicodeDecodeError as e:
                return (
                    f"{path}, line {line}: bytes {raw[e.start : e.end]!r} at column {e.start + 1} are not "
                    f"{encoding.replace('-sig', '').upper()} text"
                )
    return None


def csv_rows(path: str | Path, encoding: str = "utf-8-sig", multiline: bool = True) -> Iterator[tuple[int, list[str]]]:
    """The rows of a CSV file, header first, as ``(line where the row starts, cells)``; blank lines skipped.

    Raises :class:`TextFileError` naming the file and the line for a folder given as the file, an
    unbalanced quote, a row with another number of fields than the header, a quoted cell running over
    several lines unless ``multiline`` (one-line-per-row files: captions, references), and
    :class:`UndecodableError` for bytes that are not ``encoding``.
    """
    path = Path(path)
    if path.is_dir():
        raise TextFileError(f"{path}: is a folder, not a CSV file")
    try:
        with open(path, newline="", encoding=encoding) as f:
            reader = csv.reader(f, strict=True)  # strict: an unbalanced quote is an error, not one long cell
            width, end = None, 0
            while True:
                start = end + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise TextFileError(
                        f"{path}, line {start}: malformed CSV row ({e}; an unbalanced quote?)"
                    ) from None
                end = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if end > start and not multiline:
                    raise TextFileError(
                        f"{path}, line {start}: a quoted cell runs on to line {end} (an unbalanced quote?)"
                    )
                if width is None:
                    width = len(row)
                elif len(row) != width:
                    raise TextFileError(
                        f"{path}, line {start}: malformed CSV row: {len(row)} field(s), the header "
                        f"has {width}" + (f" (the row runs to line {end})" if end > start else "")
                    )
                yield start, row
    except UnicodeDecodeError:
        where = undecodable_line(path, encoding) or f"{path}: not {encoding} text"
        raise UndecodableError(f"{where}; save the file as UTF-8") from None


def csv_dicts(
    path: str | Path, encoding: str = "utf-8-sig", multiline: bool = True
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header (names stripped) and the rows as ``(line, {column: cell})`` of a CSV file (errors as
    :func:`csv_rows`; an empty file has no columns and no rows)."""
    rows = csv_rows(path, encoding, multiline)
    first = next(rows, None)
    if first is None:
        return [], []
    header = [h.strip() for h in first[1]]
    return header, [(line, dict(zip(header, cells))) for line, cells in rows]
