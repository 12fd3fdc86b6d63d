"""Scoring captions: every metric on one PTB tokenisation, the corpus and per-clip values, what can run here."""

from __future__ import annotations

from typing import Hashable, Iterable, Mapping, Sequence

from . import coco
from .errors import DOWNLOAD_COMMAND, MetricUnavailableError

FENSE_METRICS = ("sbert_sim", "fer", "fense", "spider_fl")
ALL_METRICS = ("bleu", "meteor", "rouge_l", "cider_d", "spice", "spider") + FENSE_METRICS
DEFAULT_METRICS = ALL_METRICS


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


def normalise_metrics(metrics: Iterable[str] | str) -> list[str]:
    """Requested metric names -> canonical names (``rouge`` -> ``rouge_l``...), once each; unknown ones refused."""
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

    ``fense_options``: keyword arguments of :meth:`captioning.metrics.fense.FenseScorer.load` (``sbert``,
    ``echecker``, ``echecker_bert``, ``device``); the scorer is loaded here (a few seconds) so that the caller
    can pass it on. ``fense=False`` leaves the FENSE metrics out without looking for their models.
    """
    ok, why = ["bleu", "rouge_l", "cider_d"], {}
    try:
        coco.java_binary()
        ok.insert(1, "meteor")
    except MetricUnavailableError as e:
        why["meteor"] = str(e)
    missing = coco.missing_spice_files()
    if missing or "meteor" in why:
        why["spice"] = why["spider"] = why.get("meteor") or (
            f"missing Stanford CoreNLP 3.6.0 jars: {', '.join(map(str, missing))} (`{DOWNLOAD_COMMAND} --only spice`)"
        )
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


def _texts(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], ids: list, tokenize: bool
) -> tuple[list[str], list[list[str]]]:
    """Candidates and reference lists in ``ids`` order, one line each, PTB-tokenised in one Java call."""
    cands = [coco.clean_line(predictions[i]) for i in ids]
    refs = [[coco.clean_line(r) for r in references[i]] for i in ids]
    if not tokenize:
        return cands, refs
    flat = coco.ptb_tokenize(cands + [r for rs in refs for r in rs])
    pos, tok_refs = len(cands), []
    for rs in refs:
        tok_refs.append(flat[pos : pos + len(rs)])
        pos += len(rs)
    return flat[: len(cands)], tok_refs


def evaluate_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Iterable[str] | str = DEFAULT_METRICS,
    *,
    tokenize: bool = True,
    return_per_clip: bool = False,
    fense=None,
):
    """Score predicted captions against reference captions.

    ``predictions``: {clip id: caption}; ``references``: {clip id: [caption, ...]} with the same ids.
    ``metrics``: any of ``bleu`` (gives ``bleu_1``..``bleu_4``), ``meteor``, ``rouge_l``, ``cider_d``,
    ``spice``, ``spider``, ``sbert_sim``, ``fer``, ``fense``, ``spider_fl``. ``tokenize=False`` skips PTB
    tokenisation (for text that is already tokenised, lowercased and without punctuation; BLEU/ROUGE-L/CIDEr-D
    then need no Java). ``fense``: a loaded :class:`captioning.metrics.fense.FenseScorer` (default: load one
    with the default models when a FENSE metric is asked for).

    Returns ``{metric: corpus score}``; with ``return_per_clip=True`` returns
    ``(corpus, per_clip)`` where ``per_clip[metric][clip id]`` is the clip's score (every metric has
    per-clip values; the corpus METEOR and BLEU are *not* means of them).
    Raises :class:`MetricUnavailableError` (before any work) when Java, SPICE's jars or the FENSE models are
    unavailable.
    """
    ids = _validate(predictions, references)
    wanted = normalise_metrics(metrics)
    need_fense = any(m in wanted for m in FENSE_METRICS)
    need_spider = "spider" in wanted or "spider_fl" in wanted
    need_spice = "spice" in wanted or need_spider
    need_cider = "cider_d" in wanted or need_spider
    # fail fast, before any Java process starts
    if need_spice:
        coco.require_spice()
    if tokenize or "meteor" in wanted or need_spice:
        coco.java_binary()
    if need_cider and len(ids) < 2:
        raise ValueError("CIDEr-D (and SPIDEr) need at least 2 clips: document frequencies come from the corpus")
    if need_fense and fense is None:
        from .fense import FenseScorer

        fense = FenseScorer.load()

    cands, refs = _texts(predictions, references, ids, tokenize)
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
        total, values = coco.meteor_score(cands, refs)
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
        total, values = coco.spice_score(cands, refs)
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
