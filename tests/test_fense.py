"""captioning.metrics.fense: FENSE / FER / SPIDEr-FL plumbing on a tiny error detector built from a config and the
packaged all-MiniLM-L6-v2 as a stand-in Sentence-BERT (the published models cannot be downloaded here)."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from captioning import metrics as M
from captioning.metrics import coco
from captioning.metrics import fense as FE

pytestmark = pytest.mark.usefixtures("one_thread")

CANDS = ["A dog barks loudly!", "rain falls on a roof", "a man a man a man speaks and"]
REFS = [
    ["a dog is barking", "a dog barks twice"],
    ["rain is falling hard on a surface"],
    ["a man speaks", "someone talks", "a man is speaking while birds chirp"],
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, minilm) -> Path:
    """A tiny BERT configuration with the real uncased WordPiece tokenizer (all-MiniLM-L6-v2 uses
    bert-base-uncased's vocabulary)."""
    from transformers import BertConfig

    d = tmp_path_factory.mktemp("tiny-bert")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(minilm) / name).is_file():
            shutil.copy(Path(minilm) / name, d / name)
    BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    ).save_pretrained(d)
    return d


def make_echecker(
    path: Path, bert_dir: Path, error_logit: float, other_logit: float = -8.0, extra_position_ids: bool = True
) -> Path:
    """An echecker checkpoint in the published layout whose head is constant: sigmoid(error_logit) for the
    'error' column, sigmoid(other_logit) elsewhere."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    det = FE.ErrorDetector(AutoConfig.from_pretrained(bert_dir), 6, str(bert_dir))
    with torch.no_grad():
        det.clf.weight.zero_()
        det.clf.bias.fill_(other_logit)
        det.clf.bias[5] = error_logit
    state = det.state_dict()
    if extra_position_ids:  # transformers < 4.31 saved this buffer; the published files have it
        state["encoder.embeddings.position_ids"] = torch.arange(128)[None]
    torch.save({"model_type": str(bert_dir), "num_classes": 6, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def scorer_factory(bert_dir, minilm, tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    sbert = SentenceTransformer(minilm, device="cpu")
    root = tmp_path_factory.mktemp("echeckers")

    def make(error_logit: float, other_logit: float = -8.0) -> FE.FenseScorer:
        ck = make_echecker(root / f"e{error_logit}_{other_logit}.ckpt", bert_dir, error_logit, other_logit)
        det, tok = FE.load_echecker(ck)
        return FE.FenseScorer(sbert, det, tok, batch_size=2, models={"sbert": minilm, "echecker": str(ck)})

    return make


def test_penalise_threshold_is_strict():
    sim = np.array([0.8, 0.8, 0.8, 0.5])
    p = np.array([0.9, 0.9000001, 0.1, 1.0])
    out = FE.penalise(sim, p)
    np.testing.assert_allclose(out, [0.8, 0.08, 0.8, 0.05])


def test_echecker_text_strips_punctuation_and_lowercases():
    assert FE.echecker_text(["A Dog, barks!!!", "it's (loud)."]) == ["a dog barks", "its loud"]


def test_error_column_is_the_last(scorer_factory):
    flagged = scorer_factory(error_logit=8.0, other_logit=-8.0)  # only "error" fires
    clean = scorer_factory(error_logit=-8.0, other_logit=8.0)  # every other head fires
    probs = flagged.error_probs(CANDS)
    assert probs.shape == (3, 6) and (probs[:, 5] > 0.99).all() and (probs[:, :5] < 0.01).all()
    f, c = flagged.score(CANDS, REFS), clean.score(CANDS, REFS)
    np.testing.assert_array_equal(f["fer"], 1.0)
    np.testing.assert_array_equal(c["fer"], 0.0)
    np.testing.assert_allclose(f["fense"], 0.1 * f["sbert_sim"], rtol=1e-12)
    np.testing.assert_allclose(c["fense"], c["sbert_sim"], rtol=1e-12)


def test_punctuation_does_not_reach_the_echecker(bert_dir, tmp_path, minilm):
    ck = make_echecker(tmp_path / "e.ckpt", bert_dir, 0.0)
    det, tok = FE.load_echecker(ck)
    torch.nn.init.normal_(det.clf.weight, std=1.0)  # make the output depend on the tokens
    s = FE.FenseScorer(None, det, tok)
    a, b, c = s.error_probs(["A dog barks!!!", "a dog barks", "a cat meows"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - c).max() > 1e-4


def test_similarity_is_mean_cosine_over_references(scorer_factory, minilm):
    from sentence_transformers import SentenceTransformer

    s = scorer_factory(error_logit=-8.0)
    sim = s.similarity(CANDS, REFS)
    model = SentenceTransformer(minilm, device="cpu")
    for i, (c, refs) in enumerate(zip(CANDS, REFS)):
        e = model.encode([c] + refs, normalize_embeddings=True)
        assert sim[i] == pytest.approx(float((e[1:] @ e[0]).mean()), abs=1e-5)


def test_evaluate_captions_fense_and_spider_fl(scorer_factory, monkeypatch):
    s = scorer_factory(error_logit=8.0)
    preds = {f"c{i}": c for i, c in enumerate(CANDS)}
    refs = {f"c{i}": r for i, r in enumerate(REFS)}
    # SPICE's CoreNLP jars are not installable here: a fixed stand-in for its per-clip values
    monkeypatch.setattr(coco, "require_spice", lambda: None)
    monkeypatch.setattr(coco, "java_binary", lambda: "java")
    spice = [0.2, 0.3, 0.4]
    monkeypatch.setattr(coco, "spice_score", lambda c, r: (sum(spice) / 3, spice))
    corpus, per = M.evaluate_captions(
        preds,
        refs,
        ["cider_d", "spider", "fense", "fer", "sbert_sim", "spider_fl"],
        tokenize=False,
        return_per_clip=True,
        fense=s,
    )
    for i, k in enumerate(preds):
        assert per["spider"][k] == pytest.approx((per["cider_d"][k] + spice[i]) / 2)
        assert per["spider_fl"][k] == pytest.approx(0.1 * per["spider"][k])
        assert per["fense"][k] == pytest.approx(0.1 * per["sbert_sim"][k])
    assert corpus["fer"] == 1.0
    assert corpus["fense"] == pytest.approx(np.mean(list(per["fense"].values())))
    assert corpus["spider_fl"] == pytest.approx(0.1 * corpus["spider"])


def test_missing_models_raise_clear_errors(tmp_path, monkeypatch, bert_dir):
    monkeypatch.setenv("CAPTION_METRICS_FENSE_DIR", str(tmp_path))
    monkeypatch.delenv("CAPTION_METRICS_ECHECKER", raising=False)
    with pytest.raises(M.MetricUnavailableError, match="echecker_clotho_audiocaps_base.ckpt.*download --only fense"):
        FE.load_echecker()
    with pytest.raises(M.MetricUnavailableError, match="Sentence-BERT model"):
        FE.load_sbert(str(tmp_path / "no-such-model"))
    # the evaluation refuses before doing any work, and never substitutes a model
    with pytest.raises(M.MetricUnavailableError, match="error-detector checkpoint"):
        M.evaluate_captions({"a": "x y", "b": "y z"}, {"a": ["x y"], "b": ["y z"]}, ["fense"], tokenize=False)
    ok, why, scorer = M.available_metrics()
    assert scorer is None and "fense" not in ok and "echecker" in why["fense"] and "spider_fl" in why


def test_wrong_checkpoints_are_rejected(tmp_path, bert_dir, monkeypatch):
    bad = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="model.ckpt.*not a FENSE error-detector checkpoint"):
        FE.load_echecker(bad)
    # a file with a published name must have the published sha256
    monkeypatch.setenv("CAPTION_METRICS_FENSE_DIR", str(tmp_path))
    make_echecker(tmp_path / "echecker_clotho_audiocaps_base.ckpt", bert_dir, 0.0)
    with pytest.raises(ValueError, match="sha256"):
        FE.load_echecker("echecker_clotho_audiocaps_base")
    # a checkpoint for a different BERT size
    ck = make_echecker(tmp_path / "e.ckpt", bert_dir, 0.0)
    other = tmp_path / "bigger"
    shutil.copytree(bert_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    with pytest.raises(ValueError, match="e.ckpt: does not fit"):
        FE.load_echecker(ck, bert=other)


def test_cli_lists_unavailable_fense(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPTION_METRICS_FENSE_DIR", str(tmp_path))
    (tmp_path / "p.csv").write_text("file_name,caption\na,a dog barks\nb,rain falls\n")
    (tmp_path / "r.csv").write_text("file_name,caption_1\na,a dog is barking\nb,rain is falling\n")
    rc = M.main(
        [
            "--predictions",
            str(tmp_path / "p.csv"),
            "--references",
            str(tmp_path / "r.csv"),
            "--no-tokenize",
            "--out",
            str(tmp_path / "o.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "cider_d" in out and "sbert_sim, fer, fense, spider_fl: unavailable (" in out
    assert "fense" in json.loads((tmp_path / "o.json").read_text())["unavailable"]
    rc = M.main(
        [
            "--predictions",
            str(tmp_path / "p.csv"),
            "--references",
            str(tmp_path / "r.csv"),
            "--no-tokenize",
            "--metrics",
            "fense",
        ]
    )
    assert rc == 2 and "echecker" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("aac_metrics") is None, reason="aac-metrics (optional extra) is not installed"
)
def test_matches_aac_metrics_fense(scorer_factory):
    from aac_metrics.functional.fense import fense as aac_fense

    s = scorer_factory(error_logit=0.0)
    torch.manual_seed(1)
    torch.nn.init.normal_(s.echecker.clf.weight, std=2.0)  # some captions above the threshold, some below
    ours = s.score(CANDS, REFS)
    corpus, sents = aac_fense(
        CANDS,
        REFS,
        sbert_model=s.sbert,
        echecker=s.echecker,
        echecker_tokenizer=s.tokenizer,
        device="cpu",
        batch_size=2,
        return_all_scores=True,
    )
    np.testing.assert_allclose(sents["fense"].numpy(), ours["fense"], atol=1e-5)
    np.testing.assert_allclose(sents["sbert_sim"].numpy(), ours["sbert_sim"], atol=1e-5)
    np.testing.assert_array_equal(sents["fer"].numpy(), ours["fer"])
    assert float(corpus["fense"]) == pytest.approx(ours["fense"].mean(), abs=1e-5)


def test_hf_models_come_from_the_hub_only_when_online(monkeypatch):
    """The loader is m2dclap.clap.load_local_first's: the cache first; the hub only when downloads are on and
    its host answers (no minute of retries offline)."""
    from m2dclap import clap

    calls = []

    def load(source, local_files_only=False):
        calls.append(local_files_only)
        if local_files_only:
            raise OSError("not in the cache")
        return "model"

    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(M.MetricUnavailableError, match=r"the model 'org/name'.*downloads are off \(HF_HUB_OFFLINE\)"):
        FE._hf_load(load, "org/name", "the model")
    assert calls == [True]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(clap, "_hub_unreachable", lambda: "huggingface.co is not reachable (no route)")
    with pytest.raises(M.MetricUnavailableError, match="huggingface.co is not reachable.*download --only fense"):
        FE._hf_load(load, "org/name", "the model")
    assert calls == [True, True]
    monkeypatch.setattr(clap, "_hub_unreachable", lambda: None)
    assert FE._hf_load(load, "org/name", "the model") == "model" and calls == [True, True, True, False]


def test_score_needs_references_for_every_candidate():
    s = FE.FenseScorer(None, None, None)
    with pytest.raises(ValueError, match=r"candidate\(s\) \[1\] have no references"):
        s.score(["a", "b"], [["x"], []])
    with pytest.raises(ValueError, match="2 candidates but 1"):
        s.score(["a", "b"], [["x"]])
