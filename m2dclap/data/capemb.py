"""Caption-embedding files: pre-computed text embeddings keyed by clip id (reference/m2d-official.md section 4).

The official files (``capemb_*.npy``, ``--file_caption``) are ``np.save(path, {id: float16 [D] or [n, D]})``:
a 0-d object array whose payload is a pickle. ``np.load(allow_pickle=True)`` would run arbitrary code from
such a file, so :func:`load_caption_embeddings` parses the ``.npy`` header itself and unpickles the payload
with an allow-list that admits only what numpy needs to rebuild a dict of arrays. ``.npz`` files
(one array per id) are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np


class CaptionEmbeddingError(ValueError):
    """A caption-embedding file that cannot be used safely; the message names the file."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Pickles of protocol 2 (Python 2 era numpy) spell raw bytes as _codecs.encode(text, "latin1").
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # Files written by numpy 1.x name numpy.core, those written by numpy 2.x numpy._core; both map to the
    # same functions here, without importing the deprecated alias.
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def __init__(self, file: Any, source: Path):
        super().__init__(file, encoding="latin1")  # latin1: numpy's choice for Python 2 pickles
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise CaptionEmbeddingError(
                f"{self._source}: refused to unpickle the global '{module}.{name}'; a caption-embedding file "
                "may only hold a dict of numpy arrays (this file may be malicious)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CaptionEmbeddingError(f"{self._source}: refused a persistent id in the pickle")


def load_caption_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``{id: array [D] or [n, D]}`` from an official ``.npy`` dict or an ``.npz`` file, safely.

    Arrays keep their dtype (float16 in the official files). Raises :class:`CaptionEmbeddingError` naming
    the file for anything that is not a mapping of string ids to 1-D or 2-D numeric arrays, and for any
    pickle that refers to a global outside numpy's array reconstruction.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionEmbeddingError(f"{path}: no such caption-embedding file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        obj = _load_npy(path)
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                obj = {key: z[key] for key in z.files}
        except ValueError as e:  # object arrays inside the npz
            raise CaptionEmbeddingError(f"{path}: cannot read without unpickling ({e})") from None
        except (OSError, EOFError) as e:
            raise CaptionEmbeddingError(f"{path}: not a readable .npz file ({e})") from None
    else:
        raise CaptionEmbeddingError(f"{path}: unknown extension {path.suffix!r}; use .npy (official dict) or .npz")
    return _validate(obj, path)


def _load_npy(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as e:
            raise CaptionEmbeddingError(f"{path}: not a .npy file ({e})") from None
        if not dtype.hasobject:
            raise CaptionEmbeddingError(
                f"{path}: holds a plain {dtype} array of shape {shape}, not a dict "
                "{id: embedding}; save one with save_caption_embeddings"
            )
        try:
            obj = _RestrictedUnpickler(f, path).load()
        except CaptionEmbeddingError:
            raise
        except Exception as e:  # truncated or garbled pickle
            raise CaptionEmbeddingError(f"{path}: cannot read the pickled payload ({type(e).__name__}: {e})") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()  # np.save(dict) stores a 0-d object array holding the dict
    return obj


def _validate(obj: Any, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise CaptionEmbeddingError(f"{path}: expected a dict {{id: embedding}}, got {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("utf-8")
        if not isinstance(key, str):
            raise CaptionEmbeddingError(f"{path}: id {key!r} is a {type(key).__name__}, not a string")
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiu" or arr.ndim not in (1, 2) or arr.size == 0:
            raise CaptionEmbeddingError(
                f"{path}: embedding of {key!r} must be a non-empty numeric [D] or [n, D] "
                f"array, got dtype {arr.dtype} and shape {arr.shape}"
            )
        out[key] = arr
    dims = {a.shape[-1] for a in out.values()}
    if len(dims) > 1:
        raise CaptionEmbeddingError(f"{path}: embeddings of different widths {sorted(dims)}")
    return out


def save_caption_embeddings(emb: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``{id: [D] or [n, D]}`` in the official form (``np.save`` of a dict, float16), atomically."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        raise CaptionEmbeddingError(f"{path}: the official caption-embedding form is a .npy file")
    data: dict[str, np.ndarray] = {}
    for key, value in emb.items():
        arr = np.asarray(value if not hasattr(value, "detach") else value.detach().cpu().numpy())
        if arr.ndim not in (1, 2) or arr.dtype.kind not in "fiu":
            raise CaptionEmbeddingError(
                f"{path}: embedding of {key!r} must be a numeric [D] or [n, D] array, "
                f"got dtype {arr.dtype} and shape {arr.shape}"
            )
        data[str(key)] = np.ascontiguousarray(arr, dtype=np.float16)
    from ..fileio import atomic_write

    with atomic_write(path) as f:
        np.save(f, data, allow_pickle=True)  # writing a pickle is safe; reading one is what we guard
    return path
