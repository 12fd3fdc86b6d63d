"""The coco-caption metrics that run pycocoevalcap's jars: PTB tokenisation, METEOR 1.5 and SPICE.

Every jar runs from here with an explicit classpath and a private temporary directory, so nothing is
written inside the installed package. ``CAPTION_METRICS_JAVA`` names the ``java`` binary (default: ``java``
on PATH); ``CAPTION_METRICS_SPICE_DIR`` a folder holding ``spice-1.0.jar`` and ``lib/`` (default:
pycocoevalcap's ``spice`` folder).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import DOWNLOAD_COMMAND, MetricUnavailableError

# punctuation tokens removed after PTB tokenisation (coco-caption's list)
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def pycocoevalcap_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailableError(
            "pycocoevalcap is not installed; install it with `pip install pycocoevalcap==1.2` "
            "(it ships the PTB tokenizer, METEOR and SPICE jars)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def java_binary() -> str:
    java = os.environ.get("CAPTION_METRICS_JAVA") or shutil.which("java")
    if not java or not Path(java).exists():
        raise MetricUnavailableError(
            "Java was not found (looked at $CAPTION_METRICS_JAVA and `java` on PATH); PTB tokenisation, "
            "METEOR and SPICE need a Java runtime (8 or newer; 17 works)"
        )
    return java


def _jar(relpath: str) -> Path:
    path = pycocoevalcap_dir() / relpath
    if not path.is_file():
        raise MetricUnavailableError(f"missing file {path} (reinstall pycocoevalcap==1.2)")
    return path


def spice_dir() -> Path:
    env = os.environ.get("CAPTION_METRICS_SPICE_DIR")
    return Path(env) if env else pycocoevalcap_dir() / "spice"


def missing_spice_files(directory: str | os.PathLike | None = None) -> list[Path]:
    """Files SPICE needs that are absent (empty list when SPICE can run)."""
    d = Path(directory) if directory is not None else spice_dir()
    need = [d / "spice-1.0.jar"] + [d / "lib" / name for name in CORENLP_JARS]
    return [p for p in need if not p.is_file()]


def require_spice() -> Path:
    """The SPICE folder; a MetricUnavailableError naming the missing jars when SPICE cannot run."""
    missing = missing_spice_files()
    if missing:
        raise MetricUnavailableError(
            "SPICE (and SPIDEr) need the Stanford CoreNLP 3.6.0 jars, which are not installed; missing: "
            + ", ".join(str(p) for p in missing)
            + f". On a machine with internet access run `{DOWNLOAD_COMMAND}` (or point "
            "$CAPTION_METRICS_SPICE_DIR at a folder holding spice-1.0.jar and lib/ with those jars), "
            "or leave 'spice' and 'spider' out of the requested metrics."
        )
    return spice_dir()


def clean_line(text: str) -> str:
    """One line, single spaces: what the jars and the PTB tokenizer read per caption."""
    return " ".join(str(text).replace("\r", " ").replace("\n", " ").split())


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """PTB-tokenise and lowercase ``sentences`` with one Java call, dropping punctuation tokens."""
    sentences = [clean_line(s) for s in sentences]
    if not sentences:
        return []
    java = java_binary()
    jar = _jar("tokenizer/stanford-corenlp-3.4.1.jar")
    with tempfile.TemporaryDirectory(prefix="ptb_") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_text("\n".join(sentences), encoding="utf-8")
        proc = subprocess.run(
            [
                java,
                "-cp",
                str(jar),
                "edu.stanford.nlp.process.PTBTokenizer",
                "-preserveLines",
                "-lowerCase",
                "-encoding",
                "utf-8",
                str(src),
            ],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
        )
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) > len(sentences) and all(not x.strip() for x in lines[len(sentences) :]):
        lines = lines[: len(sentences)]
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in PUNCTUATIONS) for line in lines]


def meteor_score(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """METEOR 1.5 (``-l en -norm``): (aggregate corpus score, per-candidate scores)."""
    if len(candidates) != len(references):
        raise ValueError("candidates and references differ in length")
    if not candidates:
        raise ValueError("METEOR needs at least one candidate")
    java = java_binary()
    jar = _jar("meteor/meteor-1.5.jar")
    _jar("meteor/data/paraphrase-en.gz")

    def clean(s: str) -> str:
        return " ".join(clean_line(s).replace("|||", " ").split())

    cmd = [
        java,
        "-Xmx2G",
        "-Duser.language=en",
        "-Duser.country=US",
        "-jar",
        str(jar),
        "-",
        "-",
        "-stdio",
        "-l",
        "en",
        "-norm",
    ]
    with tempfile.TemporaryDirectory(prefix="meteor_") as tmp, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=tmp, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        try:

            def ask(line: str) -> str:
                proc.stdin.write((line + "\n").encode("utf-8"))
                proc.stdin.flush()
                out = proc.stdout.readline().decode("utf-8").strip()
                if not out:
                    err.seek(0)
                    raise RuntimeError("METEOR jar stopped answering: " + err.read().decode(errors="replace")[-2000:])
                return out

            stats = [
                ask(" ||| ".join(["SCORE", " ||| ".join(clean(r) for r in refs), clean(c)]))
                for c, refs in zip(candidates, references)
            ]
            proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
            proc.stdin.flush()
            per = [float(proc.stdout.readline().decode().strip()) for _ in stats]
            corpus = float(proc.stdout.readline().decode().strip())
        finally:
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return corpus, per


def spice_score(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """SPICE F-score: (mean over clips, per-candidate scores). Raises MetricUnavailableError without CoreNLP."""
    if len(candidates) != len(references):
        raise ValueError("candidates and references differ in length")
    d = require_spice()
    java = java_binary()
    with tempfile.TemporaryDirectory(prefix="spice_") as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        data = [{"image_id": i, "test": c, "refs": list(r)} for i, (c, r) in enumerate(zip(candidates, references))]
        inp.write_text(json.dumps(data), encoding="utf-8")
        proc = subprocess.run(
            [java, "-Xmx8G", "-jar", str(d / "spice-1.0.jar"), str(inp), "-out", str(out), "-subset", "-silent"],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"SPICE failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
        results = json.loads(out.read_text(encoding="utf-8"))
    by_id = {item["image_id"]: item["scores"]["All"]["f"] for item in results}

    def to_float(v) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    per = [to_float(by_id.get(i)) for i in range(len(candidates))]
    return float(sum(per) / len(per)), per
