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

FENSE, SBERT-sim, FER and SPIDEr-FL (:mod:`captioning.metrics.fense`) need the Sentence-BERT model and the FENSE
error-detector checkpoint on this machine; they are computed on the same PTB-tokenised text as aac-metrics
does (the DCASE 2024 evaluation). Without those models they raise :class:`MetricUnavailableError`.

All jars are run from :mod:`.coco` with an explicit classpath and a private temporary directory, so
nothing is written inside the installed package (except by ``download``, which installs the CoreNLP
jars into the SPICE ``lib/`` folder).

Environment variables: ``CAPTION_METRICS_JAVA`` (path of the ``java`` binary; default: ``java`` on
PATH), ``CAPTION_METRICS_SPICE_DIR`` (a folder holding ``spice-1.0.jar`` and ``lib/``; default:
pycocoevalcap's ``spice`` folder).

The package: :mod:`.scoring` (``evaluate_captions``, ``available_metrics``), :mod:`.coco` (the jars: PTB
tokenizer, METEOR, SPICE), :mod:`.fense` (FENSE, FER, SPIDEr-FL), :mod:`.io` (the CSV files),
:mod:`.download` (CoreNLP jars, FENSE models), :mod:`.cli` (``python -m captioning.metrics``), :mod:`.errors`.
"""

from __future__ import annotations

from .cli import FenseOptions, fense_options, main, unavailable_lines
from .coco import (
    CORENLP_JARS,
    PUNCTUATIONS,
    java_binary,
    meteor_score,
    missing_spice_files,
    ptb_tokenize,
    pycocoevalcap_dir,
    spice_dir,
    spice_score,
)
from .download import download_fense_models, download_spice_models
from .errors import DOWNLOAD_COMMAND, MetricUnavailableError
from .fense import FenseScorer
from .io import read_predictions_csv, read_references_csv, write_predictions
from .scoring import ALL_METRICS, DEFAULT_METRICS, FENSE_METRICS, available_metrics, evaluate_captions

__all__ = [
    "ALL_METRICS",
    "CORENLP_JARS",
    "DEFAULT_METRICS",
    "DOWNLOAD_COMMAND",
    "FENSE_METRICS",
    "PUNCTUATIONS",
    "FenseOptions",
    "FenseScorer",
    "MetricUnavailableError",
    "available_metrics",
    "download_fense_models",
    "download_spice_models",
    "evaluate_captions",
    "fense_options",
    "java_binary",
    "main",
    "meteor_score",
    "missing_spice_files",
    "ptb_tokenize",
    "pycocoevalcap_dir",
    "read_predictions_csv",
    "read_references_csv",
    "spice_dir",
    "spice_score",
    "unavailable_lines",
    "write_predictions",
]
