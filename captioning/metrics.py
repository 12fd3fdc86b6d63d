"""Caption metrics: PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr, FENSE, SPIDEr-FL.

The definitions are those of the coco-caption toolkit as packaged in ``pycocoevalcap`` 1.2, which is
what the audio-captioning literature (and ``aac-metrics``) report:

* every caption (candidate and reference) is PTB-tokenised with the Stanford ``PTBTokenizer``
  (``stanford-corenlp-3.4.1.jar`` shipped in pycocoevalcap, ``-preserveLines -lowerCase``) and the
  punctuation tokens in :data:`PUNCTUATIONS` are dropped; Java runs **once per evaluation**;
* BLEU-1..4 (``closest`` reference length), ROUGE-L and CIDEr-D come from pycocoevalcap's pure-Python
  ``Bleu``, ``Rouge`` and ``Cider`` scorers (``Cider`` *is* CIDEr-D: sigma=6 length penalty, clipped
  n-gram counts, x10); CIDEr-D's document frequencies come from the evaluated corpus, so it needs at
  least two clips;
* METEOR 1.5 runs pycocoevalcap's ``meteor-1.5.jar`` (with its ``data/paraphrase-en.gz``) with the
  machine's Java, started once per evaluation; the corpus figure is the jar's aggregate ``EVAL``
  value (not the mean of the per-clip values);
* SPICE runs pycocoevalcap's ``spice-1.0.jar``; it needs the Stanford CoreNLP 3.6.0 jars in its
  ``lib/`` folder, which no wheel ships: ``python -m captioning.metrics download`` fetches them on an
  online machine. Without them, asking for SPICE or SPIDEr raises :class:`MetricUnavailableError`
  naming the missing files. SPIDEr = (CIDEr-D + SPICE) / 2, per clip and for the corpus.

FENSE, SBERT-sim, FER and SPIDEr-FL (:mod:`captioning.fense`) need the Sentence-BERT model and the FENSE
error-detector checkpoint on this machine; they are computed on the same PTB-tokenised text as aac-metrics
does (the DCASE 2024 evaluation). Without those models they raise :class:`MetricUnavailableError`.

All jars are run from this module with an explicit classpath and a private temporary directory, so
nothing is written inside the installed package (except by ``download``, which installs the CoreNLP
jars into the SPICE ``lib/`` folder).

Environment variables: ``CAPTION_METRICS_JAVA`` (path of the ``java`` binary; default: ``java`` on
PATH), ``CAPTION_METRICS_SPICE_DIR`` (a folder holding ``spice-1.0.jar`` and ``lib/``; default:
pycocoevalcap's ``spice`` folder).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Hashable, Iterable, Mapping, Sequence

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "PUNCTUATIONS",
    "MetricUnavailableError",
    "FENSE_METRICS",
    "available_metrics",
    "evaluate_captions",
    "ptb_tokenize",
    "meteor_score",
    "spice_score",
    "missing_spice_files",
    "download_spice_models",
    "read_predictions_csv",
    "read_references_csv",
    "main",
]

FENSE_METRICS = ("sbert_sim", "fer", "fense", "spider_fl")
ALL_METRICS = ("bleu", "meteor", "rouge_l", "cider_d", "spice", "spider") + FENSE_METRICS
DEFAULT_METRICS = ALL_METRICS

# punctuation tokens removed after PTB tokenisation (coco-caption's list)
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
DOWNLOAD_COMMAND = "python -m captioning.metrics download"


class MetricUnavailableError(RuntimeError):
    """A metric cannot run on this machine (missing Java, jar or model file)."""


# --------------------------------------------------------------------------------------------------
# locating Java and the jars
# --------------------------------------------------------------------------------------------------

def pycocoevalcap_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailableError(
            "pycocoevalcap is not installed; install it with `pip install pycocoevalcap==1.2` "
            "(it ships the PTB tokenizer, METEOR and SPICE jars)")
    return Path(list(spec.submodule_search_locations)[0])


def java_binary() -> str:
    java = os.environ.get("CAPTION_METRICS_JAVA") or shutil.which("java")
    if not java or not Path(java).exists():
        raise MetricUnavailableError(
            "Java was not found (looked at $CAPTION_METRICS_JAVA and `java` on PATH); PTB tokenisation, "
            "METEOR and SPICE need a Java runtime (8 or newer; 17 works)")
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


def _require_spice() -> Path:
    missing = missing_spice_files()
    if missing:
        raise MetricUnavailableError(
            "SPICE (and SPIDEr) need the Stanford CoreNLP 3.6.0 jars, which are not installed; missing: "
            + ", ".join(str(p) for p in missing)
            + f". On a machine with internet access run `{DOWNLOAD_COMMAND}` (or point "
            "$CAPTION_METRICS_SPICE_DIR at a folder holding spice-1.0.jar and lib/ with those jars), "
            "or leave 'spice' and 'spider' out of the requested metrics.")
    return spice_dir()


# --------------------------------------------------------------------------------------------------
# PTB tokenisation (one Java process per call)
# --------------------------------------------------------------------------------------------------

def _clean_line(text: str) -> str:
    return " ".join(str(text).replace("\r", " ").replace("\n", " ").split())


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """PTB-tokenise and lowercase ``sentences`` with one Java call, dropping punctuation tokens."""
    sentences = [_clean_line(s) for s in sentences]
    if not sentences:
        return []
    java = java_binary()
    jar = _jar("tokenizer/stanford-corenlp-3.4.1.jar")
    with tempfile.TemporaryDirectory(prefix="ptb_") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_text("\n".join(sentences), encoding="utf-8")
        proc = subprocess.run(
            [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", "-encoding", "utf-8", str(src)],
            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) > len(sentences) and all(not x.strip() for x in lines[len(sentences):]):
        lines = lines[:len(sentences)]
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in PUNCTUATIONS) for line in lines]


# --------------------------------------------------------------------------------------------------
# METEOR 1.5 (one Java process per call)
# --------------------------------------------------------------------------------------------------

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
        return " ".join(_clean_line(s).replace("|||", " ").split())

    cmd = [java, "-Xmx2G", "-Duser.language=en", "-Duser.country=US", "-jar", str(jar),
           "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryDirectory(prefix="meteor_") as tmp, \
            tempfile.TemporaryFile() as err:
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

            stats = [ask(" ||| ".join(["SCORE", " ||| ".join(clean(r) for r in refs), clean(c)]))
                     for c, refs in zip(candidates, references)]
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


# --------------------------------------------------------------------------------------------------
# SPICE (one Java process per call; needs CoreNLP 3.6.0)
# --------------------------------------------------------------------------------------------------

def spice_score(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """SPICE F-score: (mean over clips, per-candidate scores). Raises MetricUnavailableError without CoreNLP."""
    if len(candidates) != len(references):
        raise ValueError("candidates and references differ in length")
    d = _require_spice()
    java = java_binary()
    with tempfile.TemporaryDirectory(prefix="spice_") as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        data = [{"image_id": i, "test": c, "refs": list(r)} for i, (c, r) in enumerate(zip(candidates, references))]
        inp.write_text(json.dumps(data), encoding="utf-8")
        proc = subprocess.run([java, "-Xmx8G", "-jar", str(d / "spice-1.0.jar"), str(inp),
                               "-out", str(out), "-subset", "-silent"],
                              cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
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


def _spice_download_url() -> str:
    """The CoreNLP zip URL, read from the installed pycocoevalcap's get_stanford_models script."""
    from pycocoevalcap.spice import get_stanford_models as gsm
    src = inspect.getsource(gsm)
    m = re.search(r"url\s*=\s*['\"]([^'\"]+)['\"]\s*\.format\(\s*CORENLP\s*\)", src)
    if not m:
        raise RuntimeError("could not read the CoreNLP URL from pycocoevalcap.spice.get_stanford_models")
    return m.group(1).format(gsm.CORENLP)


def download_spice_models(directory: str | os.PathLike | None = None) -> list[Path]:
    """Download Stanford CoreNLP 3.6.0 (~390 MB zip) and install its two jars into ``<spice dir>/lib``."""
    from urllib.error import URLError
    from urllib.request import urlretrieve
    from pycocoevalcap.spice import get_stanford_models as gsm

    d = Path(directory) if directory is not None else spice_dir()
    lib = d / "lib"
    targets = [lib / name for name in CORENLP_JARS]
    if all(p.is_file() for p in targets):
        print(f"CoreNLP jars already present in {lib}")
        return targets
    url = _spice_download_url()
    lib.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} ...", flush=True)
    try:
        zip_path, _ = urlretrieve(url)
    except (URLError, OSError) as exc:
        raise MetricUnavailableError(
            f"could not download {url}: {exc}. Run `{DOWNLOAD_COMMAND}` on a machine with internet access, "
            f"or copy {', '.join(CORENLP_JARS)} into {lib} by hand") from exc
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for name, target in zip(CORENLP_JARS, targets):
                member = f"{gsm.CORENLP}/{name}"
                with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
                target.with_suffix(".part").replace(target)
    finally:
        os.remove(zip_path)
    print(f"installed {', '.join(str(t) for t in targets)}")
    return targets


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------

def _validate(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> list:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError("predictions and references must be dicts keyed by clip id")
    if not predictions:
        raise ValueError("no predictions given")
    pk, rk = set(predictions), set(references)
    only_p, only_r = sorted(map(str, pk - rk)), sorted(map(str, rk - pk))
    if only_p or only_r:
        msg = []
        if only_p:
            msg.append(f"{len(only_p)} id(s) have a prediction but no references: {only_p[:10]}")
        if only_r:
            msg.append(f"{len(only_r)} id(s) have references but no prediction: {only_r[:10]}")
        raise ValueError("; ".join(msg))
    ids = list(predictions)
    for i in ids:
        if not isinstance(predictions[i], str):
            raise TypeError(f"prediction for id {i!r} is not a string")
        refs = references[i]
        if isinstance(refs, str) or not isinstance(refs, Iterable):
            raise TypeError(f"references for id {i!r} must be a list of strings")
        refs = list(refs)
        if not refs:
            raise ValueError(f"empty reference list for id {i!r}")
        for r in refs:
            if not isinstance(r, str) or not r.strip():
                raise ValueError(f"empty or non-string reference for id {i!r}: {r!r}")
    return ids


def _normalise_metrics(metrics: Iterable[str] | str) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    out = []
    for m in metrics:
        key = m.strip().lower().replace("-", "_")
        key = {"rouge": "rouge_l", "cider": "cider_d", "bleu_4": "bleu"}.get(key, key)
        if key not in ALL_METRICS:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(ALL_METRICS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("no metrics requested")
    return out


def available_metrics(fense_options: Mapping | None = None, fense: bool = True):
    """What can run here: ``(metrics, {metric: reason it cannot}, FenseScorer or None)``.

    ``fense_options``: keyword arguments of :meth:`captioning.fense.FenseScorer.load` (``sbert``,
    ``echecker``, ``echecker_bert``, ``device``); the scorer is loaded here (a few seconds) so that the caller
    can pass it on. ``fense=False`` leaves the FENSE metrics out without looking for their models.
    """
    ok, why = ["bleu", "rouge_l", "cider_d"], {}
    try:
        java_binary()
        ok.insert(1, "meteor")
    except MetricUnavailableError as e:
        why["meteor"] = str(e)
    missing = missing_spice_files()
    if missing or "meteor" in why:
        why["spice"] = why["spider"] = why.get("meteor") or (
            f"missing Stanford CoreNLP 3.6.0 jars: {', '.join(map(str, missing))} (`{DOWNLOAD_COMMAND} --only spice`)")
    else:
        ok += ["spice", "spider"]
    scorer = None
    if not fense:
        why.update({m: "not requested" for m in FENSE_METRICS})
    else:
        from .fense import FenseScorer

        try:
            scorer = FenseScorer.load(**dict(fense_options or {}))
            ok += [m for m in FENSE_METRICS if m != "spider_fl" or "spider" in ok]
            if "spider" not in ok:
                why["spider_fl"] = why["spider"]
        except MetricUnavailableError as e:
            why.update({m: str(e) for m in FENSE_METRICS})
    return ok, why, scorer


def evaluate_captions(predictions: Mapping[Hashable, str],
                      references: Mapping[Hashable, Sequence[str]],
                      metrics: Iterable[str] | str = DEFAULT_METRICS,
                      *, tokenize: bool = True, return_per_clip: bool = False, fense=None):
    """Score predicted captions against reference captions.

    ``predictions``: {clip id: caption}; ``references``: {clip id: [caption, ...]} with the same ids.
    ``metrics``: any of ``bleu`` (gives ``bleu_1``..``bleu_4``), ``meteor``, ``rouge_l``, ``cider_d``,
    ``spice``, ``spider``, ``sbert_sim``, ``fer``, ``fense``, ``spider_fl``. ``tokenize=False`` skips PTB
    tokenisation (for text that is already tokenised, lowercased and without punctuation; BLEU/ROUGE-L/CIDEr-D
    then need no Java). ``fense``: a loaded :class:`captioning.fense.FenseScorer` (default: load one with the
    default models when a FENSE metric is asked for).

    Returns ``{metric: corpus score}``; with ``return_per_clip=True`` returns
    ``(corpus, per_clip)`` where ``per_clip[metric][clip id]`` is the clip's score (every metric has
    per-clip values; the corpus METEOR and BLEU are *not* means of them).
    Raises :class:`MetricUnavailableError` (before any work) when Java, SPICE's jars or the FENSE models are
    unavailable.
    """
    ids = _validate(predictions, references)
    wanted = _normalise_metrics(metrics)
    need_fense = any(m in wanted for m in FENSE_METRICS)
    need_spider = "spider" in wanted or "spider_fl" in wanted
    need_spice = "spice" in wanted or need_spider
    need_cider = "cider_d" in wanted or need_spider
    # fail fast, before any Java process starts
    if need_spice:
        _require_spice()
    if tokenize or "meteor" in wanted or need_spice:
        java_binary()
    if need_cider and len(ids) < 2:
        raise ValueError("CIDEr-D (and SPIDEr) need at least 2 clips: document frequencies come from the corpus")
    if need_fense and fense is None:
        from .fense import FenseScorer

        fense = FenseScorer.load()

    cands = [_clean_line(predictions[i]) for i in ids]
    refs = [[_clean_line(r) for r in references[i]] for i in ids]
    if tokenize:
        flat = ptb_tokenize(cands + [r for rs in refs for r in rs])
        cands, pos = flat[:len(cands)], len(cands)
        tok_refs = []
        for rs in refs:
            tok_refs.append(flat[pos:pos + len(rs)])
            pos += len(rs)
        refs = tok_refs

    keys = list(range(len(ids)))
    res = {k: [cands[k]] for k in keys}
    gts = {k: refs[k] for k in keys}
    corpus: dict[str, float] = {}
    per: dict[str, dict] = {}

    def put(name: str, total: float, values: Sequence[float]) -> None:
        corpus[name] = float(total)
        per[name] = {ids[k]: float(v) for k, v in zip(keys, values)}

    if "bleu" in wanted:
        from pycocoevalcap.bleu.bleu import Bleu
        total, values = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            put(f"bleu_{n + 1}", total[n], values[n])
    if "meteor" in wanted:
        total, values = meteor_score(cands, refs)
        put("meteor", total, values)
    if "rouge_l" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge
        total, values = Rouge().compute_score(gts, res)
        put("rouge_l", total, values)
    if need_cider:
        from pycocoevalcap.cider.cider import Cider
        total, values = Cider().compute_score(gts, res)
        put("cider_d", total, values)
    if need_spice:
        total, values = spice_score(cands, refs)
        put("spice", total, values)
    if need_spider:
        sp = [(per["cider_d"][i] + per["spice"][i]) / 2 for i in ids]
        put("spider", (corpus["cider_d"] + corpus["spice"]) / 2, sp)
    if need_fense:
        from .fense import penalise

        f = fense.score(cands, refs)
        for name in ("sbert_sim", "fer", "fense"):
            put(name, f[name].mean(), f[name])
        if "spider_fl" in wanted:
            fl = penalise([per["spider"][i] for i in ids], f["error_prob"], fense.threshold, fense.penalty)
            put("spider_fl", fl.mean(), fl)
    # only report what was asked for (spider may have needed cider_d / spice internally)
    keep = {m for m in wanted if m != "bleu"} | ({f"bleu_{n}" for n in range(1, 5)} if "bleu" in wanted else set())
    corpus = {k: v for k, v in corpus.items() if k in keep}
    per = {k: v for k, v in per.items() if k in keep}
    return (corpus, per) if return_per_clip else corpus


# --------------------------------------------------------------------------------------------------
# CSV input and command line
# --------------------------------------------------------------------------------------------------

_ID_COLUMNS = ("file_name", "file_path")


def _id_column(fieldnames: Sequence[str] | None, path) -> str:
    for name in _ID_COLUMNS:
        if fieldnames and name in fieldnames:
            return name
    raise ValueError(f"{path}: needs a 'file_name' column (header found: {fieldnames})")


def _caption_table(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line, row)`` s of a predictions or references CSV: UTF-8, one line per row. A quoted cell
    running over lines (an unbalanced quote), bad bytes or a row of another width raise a ValueError naming
    the file and the line, instead of swallowing the rows after it (reported as missing references)."""
    from m2dclap.fileio import csv_dicts

    return csv_dicts(path, multiline=False)


def read_predictions_csv(path: str | os.PathLike) -> dict[str, str]:
    """``file_name,caption`` (one row per clip) -> {file_name: caption}."""
    header, rows = _caption_table(path)
    key = _id_column(header, path)
    if "caption" not in header:
        raise ValueError(f"{path}: needs a 'caption' column (header found: {header})")
    out: dict[str, str] = {}
    first: dict[str, int] = {}
    for line, row in rows:
        fid = row[key]
        if fid in out:
            raise ValueError(f"{path}, line {line}: duplicate prediction for {fid!r} (first on line {first[fid]})")
        out[fid], first[fid] = row["caption"], line
    return out


def write_predictions(path: str | os.PathLike, preds: Mapping[str, str]) -> None:
    """{file_name: caption} -> the ``file_name,caption`` CSV :func:`read_predictions_csv` reads (atomically)."""
    from m2dclap.fileio import atomic_write

    with atomic_write(Path(path), "w") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows(preds.items())


def read_references_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """``file_name,caption_1,...,caption_N`` -> {file_name: [non-empty captions]}."""
    header, rows = _caption_table(path)
    key = _id_column(header, path)
    cols = sorted((c for c in header if re.fullmatch(r"caption_\d+", c)), key=lambda c: int(c.split("_")[1]))
    if not cols:
        raise ValueError(f"{path}: needs caption_1..caption_N columns (header found: {header})")
    out: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for line, row in rows:
        fid = row[key]
        if fid in out:
            raise ValueError(f"{path}, line {line}: duplicate references row for {fid!r} (first on line {first[fid]})")
        out[fid], first[fid] = [row[c] for c in cols if row[c].strip()], line
    return out


_EPILOG = f"""\
input formats (UTF-8 CSV with a header row):
  predictions: file_name,caption                      one row per clip
  references:  file_name,caption_1,caption_2,...,caption_N   one row per clip; empty cells are skipped
  ('file_path' is accepted in place of 'file_name'.) Every clip must appear in both files.

metrics: bleu (bleu_1..bleu_4), meteor, rouge_l, cider_d, spice, spider, sbert_sim, fer, fense, spider_fl
  Without --metrics every metric that can run here is computed and the others are listed with the reason.
  PTB tokenisation, METEOR and SPICE need Java. SPICE and SPIDEr also need the Stanford CoreNLP 3.6.0 jars.
  FENSE, SBERT-sim, FER and SPIDEr-FL need Sentence-BERT paraphrase-TinyBERT-L6-v2 and the FENSE error
  detector (echecker_clotho_audiocaps_base.ckpt) with its BERT tokenizer, from folders or the local caches.

other command:
  {DOWNLOAD_COMMAND} [--only spice|fense] [--dir SPICE_DIR]
      fetch the CoreNLP 3.6.0 jars for SPICE and the FENSE models (internet needed)
"""


def _download_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=DOWNLOAD_COMMAND,
                                description="Download what SPICE (Stanford CoreNLP 3.6.0 jars, ~390 MB zip) and "
                                            "FENSE (Sentence-BERT, error detector, BERT tokenizer) need.")
    p.add_argument("--only", choices=("spice", "fense"), help="fetch only this part (default: both)")
    p.add_argument("--dir", default=None, help="SPICE folder (default: $CAPTION_METRICS_SPICE_DIR or pycocoevalcap's spice/)")
    args = p.parse_args(argv)
    try:
        if args.only in (None, "spice"):
            download_spice_models(args.dir)
        if args.only in (None, "fense"):
            from .fense import download_fense_models

            print("FENSE models ready:", ", ".join(download_fense_models()))
    except MetricUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def unavailable_lines(why: Mapping[str, str]) -> list[str]:
    """One line per distinct reason: ``"spice, spider: unavailable (reason)"``."""
    by_reason: dict[str, list[str]] = {}
    for metric, reason in why.items():
        by_reason.setdefault(reason, []).append(metric)
    return [f"{', '.join(metrics)}: unavailable ({reason})" for reason, metrics in by_reason.items()]


def add_fense_arguments(p: argparse.ArgumentParser) -> None:
    """The FENSE model options shared by the caption CLIs."""
    g = p.add_argument_group("FENSE models (default: $CAPTION_METRICS_* or the published names; folders, the local caches, or the "
        "Hugging Face hub unless HF_HUB_OFFLINE is set)")
    g.add_argument("--sbert", metavar="NAME|DIR", help="Sentence-BERT (default paraphrase-TinyBERT-L6-v2)")
    g.add_argument("--echecker", metavar="NAME|CKPT", help="error detector (default echecker_clotho_audiocaps_base)")
    g.add_argument("--echecker-bert", metavar="NAME|DIR",
                   help="tokenizer/config of the echecker's BERT (default: the model_type in the checkpoint)")


def fense_options(args: argparse.Namespace, device: str = "cpu") -> dict:
    return {"sbert": args.sbert, "echecker": args.echecker, "echecker_bert": args.echecker_bert, "device": device}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "download":
        return _download_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m captioning.metrics",
                                description="Score predicted captions against references (coco-caption metrics, "
                                            "SPIDEr, FENSE, SPIDEr-FL).",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="CSV: file_name,caption")
    p.add_argument("--references", required=True, help="CSV: file_name,caption_1..caption_N")
    p.add_argument("--metrics", nargs="+", help="default: every metric that can run here")
    p.add_argument("--out", default=None, help="write {'corpus': ..., 'per_clip': ...} JSON here")
    p.add_argument("--no-tokenize", action="store_true", help="skip PTB tokenisation (text already tokenised)")
    add_fense_arguments(p)
    args = p.parse_args(argv)
    why: dict[str, str] = {}
    try:
        preds = read_predictions_csv(args.predictions)
        refs = read_references_csv(args.references)
        if args.metrics:
            wanted, scorer = args.metrics, None
            if any(m in FENSE_METRICS for m in _normalise_metrics(wanted)):
                from .fense import FenseScorer

                scorer = FenseScorer.load(**fense_options(args))
        else:
            wanted, why, scorer = available_metrics(fense_options(args))
        corpus, per = evaluate_captions(preds, refs, wanted, tokenize=not args.no_tokenize,
                                        return_per_clip=True, fense=scorer)
    except (MetricUnavailableError, ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, v in corpus.items():
        print(f"{k:9s} {v:.6f}")
    for line in unavailable_lines(why):
        print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = {"n_clips": len(preds), "corpus": corpus, "per_clip": per, "unavailable": why,
                  "fense_models": scorer.models if scorer is not None else None}
        from m2dclap.fileio import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=2))  # a killed run keeps the previous scores
    return 0


if __name__ == "__main__":
    # run the package's module, not this __main__ copy: captioning.fense raises captioning.metrics'
    # MetricUnavailableError, which the copy's except clauses would not recognise
    from captioning.metrics import main as _main

    sys.exit(_main())
