"""captioning.metrics: golden two-clip values (pycocoevalcap 1.2 / aac-metrics), SPICE gating, validation, CLI."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (jars + coco scorers) is not installed")

from captioning import metrics as M  # noqa: E402
from captioning.metrics import coco, download  # noqa: E402

PREDS = {"a": "a man is speaking", "b": "rain falls"}
REFS = {
    "a": ["a man speaks", "someone speaks", "a man is speaking while a bird is chirping in the background"],
    "b": ["rain is falling hard on a surface"],
}
GOLD_BLEU = [0.42784759905121095, 0.4058918713139846, 0.43896546187160046, 0.45649954547375826]
GOLD_ROUGE = 0.48706932685053234
GOLD_ROUGE_CLIPS = [0.7721519, 0.20198675]
GOLD_CIDER = 0.9613547163493906
GOLD_CIDER_CLIPS = [1.36405492, 0.55865452]
GOLD_METEOR = 0.26338060861806095
GOLD_METEOR_CLIPS = [0.8241563055062167, 0.12809018869872418]


def _java_ok() -> bool:
    try:
        M.java_binary()
        return True
    except M.MetricUnavailableError:
        return False


needs_java = pytest.mark.skipif(not _java_ok(), reason="Java is not installed (PTB tokenizer / METEOR need it)")


def _check_non_java(corpus, per, tol_clip=1e-6):
    for n, gold in enumerate(GOLD_BLEU, 1):
        assert corpus[f"bleu_{n}"] == pytest.approx(gold, abs=1e-6)
    assert corpus["rouge_l"] == pytest.approx(GOLD_ROUGE, abs=1e-6)
    assert corpus["cider_d"] == pytest.approx(GOLD_CIDER, abs=1e-6)
    assert [per["rouge_l"][k] for k in "ab"] == pytest.approx(GOLD_ROUGE_CLIPS, abs=tol_clip)
    assert [per["cider_d"][k] for k in "ab"] == pytest.approx(GOLD_CIDER_CLIPS, abs=tol_clip)


def test_golden_without_java_on_pretokenised_text():
    corpus, per = M.evaluate_captions(PREDS, REFS, ["bleu", "rouge_l", "cider_d"], tokenize=False, return_per_clip=True)
    assert set(corpus) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}
    _check_non_java(corpus, per)


@pytest.fixture(scope="module")
def full_eval():
    # one evaluation (one PTB and one METEOR Java start) shared by the Java tests
    return M.evaluate_captions(PREDS, REFS, ["bleu", "meteor", "rouge_l", "cider_d"], return_per_clip=True)


@needs_java
def test_golden_with_ptb_and_meteor(full_eval):
    corpus, per = full_eval
    _check_non_java(corpus, per)
    assert corpus["meteor"] == pytest.approx(GOLD_METEOR, abs=1e-6)
    assert [per["meteor"][k] for k in "ab"] == pytest.approx(GOLD_METEOR_CLIPS, abs=1e-6)
    # the corpus METEOR is the jar's aggregate, not the mean of the clip scores
    assert abs(corpus["meteor"] - sum(GOLD_METEOR_CLIPS) / 2) > 0.1


@needs_java
def test_ptb_tokenizer_lowercases_and_strips_punctuation():
    out = M.ptb_tokenize(["A man speaks.", "Rain, falling; hard!", "", "Dog's bark"])
    assert out == ["a man speaks", "rain falling hard", "", "dog 's bark"]


@needs_java
def test_tokenisation_changes_raw_text_scores_to_golden():
    # raw, cased, punctuated text: PTB tokenisation brings it back to the golden numbers
    raw_p = {"a": "A man is speaking.", "b": "Rain falls!"}
    raw_r = {
        "a": ["A man speaks.", "Someone speaks", "A man is speaking, while a bird is chirping in the background."],
        "b": ["Rain is falling hard on a surface."],
    }
    corpus = M.evaluate_captions(raw_p, raw_r, ["cider_d", "bleu"])
    assert corpus["cider_d"] == pytest.approx(GOLD_CIDER, abs=1e-6)
    untok = M.evaluate_captions(raw_p, raw_r, ["cider_d"], tokenize=False)
    assert abs(untok["cider_d"] - GOLD_CIDER) > 1e-3


def test_spice_missing_jars_error_names_files(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTION_METRICS_SPICE_DIR", str(tmp_path))
    (tmp_path / "spice-1.0.jar").write_bytes(b"")
    missing = M.missing_spice_files()
    assert [p.name for p in missing] == list(M.CORENLP_JARS)
    for metric in ("spice", "spider"):
        with pytest.raises(M.MetricUnavailableError) as ei:
            M.evaluate_captions(PREDS, REFS, [metric])
        msg = str(ei.value)
        assert "stanford-corenlp-3.6.0.jar" in msg and "stanford-corenlp-3.6.0-models.jar" in msg
        assert "python -m captioning.metrics download" in msg


@pytest.mark.skipif(
    bool(M.missing_spice_files()) or not _java_ok(),
    reason="SPICE needs Java and the Stanford CoreNLP 3.6.0 jars "
    "(run `python -m captioning.metrics download` on an online machine)",
)
def test_spice_and_spider_real():
    corpus, per = M.evaluate_captions(PREDS, REFS, ["cider_d", "spice", "spider"], return_per_clip=True)
    assert 0.0 <= corpus["spice"] <= 1.0
    assert per["spice"]["a"] > per["spice"]["b"]
    assert corpus["spider"] == pytest.approx((corpus["cider_d"] + corpus["spice"]) / 2)


def test_spider_is_mean_of_cider_d_and_spice(monkeypatch):
    # plumbing only: stand-in SPICE values (marked as such) check SPIDEr's combination rule
    monkeypatch.setattr(coco, "require_spice", lambda: None)
    monkeypatch.setattr(coco, "spice_score", lambda c, r: (0.3, [0.4, 0.2]))
    corpus, per = M.evaluate_captions(PREDS, REFS, ["spider"], tokenize=False, return_per_clip=True)
    assert set(corpus) == {"spider"}
    assert corpus["spider"] == pytest.approx((GOLD_CIDER + 0.3) / 2, abs=1e-9)
    assert per["spider"]["a"] == pytest.approx((GOLD_CIDER_CLIPS[0] + 0.4) / 2, abs=1e-6)


@pytest.mark.parametrize(
    "preds,refs,match",
    [
        ({"a": "x", "b": "y", "c": "z"}, REFS, "no references"),
        ({"a": "x"}, REFS, "no prediction"),
        (PREDS, {"a": REFS["a"], "b": []}, "empty reference list"),
        (PREDS, {"a": REFS["a"], "b": ["  "]}, "empty or non-string reference"),
        ({}, {}, "no predictions"),
    ],
)
def test_validation_errors(preds, refs, match):
    with pytest.raises(ValueError, match=match):
        M.evaluate_captions(preds, refs, ["bleu"], tokenize=False)


def test_other_input_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        M.evaluate_captions(PREDS, REFS, ["bertscore"], tokenize=False)
    with pytest.raises(ValueError, match="at least 2 clips"):
        M.evaluate_captions({"a": PREDS["a"]}, {"a": REFS["a"]}, ["cider_d"], tokenize=False)
    with pytest.raises(TypeError, match="must be a list of strings"):
        M.evaluate_captions(PREDS, {"a": "a man speaks", "b": REFS["b"]}, ["bleu"], tokenize=False)


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CAPTION_METRICS_JAVA", "/nonexistent/java")
    with pytest.raises(M.MetricUnavailableError, match="Java was not found"):
        M.evaluate_captions(PREDS, REFS, ["meteor"])


def _write_csvs(tmp_path):
    p = tmp_path / "p.csv"
    r = tmp_path / "r.csv"
    p.write_text("file_name,caption\n" + "".join(f"{k},{v}\n" for k, v in PREDS.items()))
    r.write_text(
        f"file_name,caption_1,caption_2,caption_3\na,{REFS['a'][0]},{REFS['a'][1]},{REFS['a'][2]}\nb,{REFS['b'][0]},,\n"
    )
    return p, r


def test_csv_readers(tmp_path):
    p, r = _write_csvs(tmp_path)
    assert M.read_predictions_csv(p) == PREDS
    assert M.read_references_csv(r) == REFS
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\na,b\n")
    with pytest.raises(ValueError, match="file_name"):
        M.read_predictions_csv(bad)


@pytest.mark.parametrize(
    "content, line, match",
    [
        (b"file_name,caption\na,fine\nb,caf\xe9\n", 3, "not UTF-8"),
        (b'file_name,caption\na,"unclosed\nb,x\n', 2, "quote"),
        (b"file_name,caption\na,x\nb,y,z\n", 3, "3 field"),
        (b"file_name,caption\na,x\na,y\n", 3, "duplicate prediction"),
    ],
)
def test_csv_reader_errors_name_file_and_line(tmp_path, content, line, match):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        M.read_predictions_csv(bad)
    assert f"{bad}, line {line}:" in str(info.value)


def test_cli_writes_json(tmp_path, capsys):
    p, r = _write_csvs(tmp_path)
    out = tmp_path / "o" / "scores.json"
    rc = M.main(
        [
            "--predictions",
            str(p),
            "--references",
            str(r),
            "--metrics",
            "bleu",
            "rouge_l",
            "cider_d",
            "--no-tokenize",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["corpus"]["cider_d"] == pytest.approx(GOLD_CIDER, abs=1e-6)
    assert data["per_clip"]["rouge_l"]["b"] == pytest.approx(GOLD_ROUGE_CLIPS[1], abs=1e-6)
    assert "cider_d" in capsys.readouterr().out


def test_cli_reports_missing_spice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAPTION_METRICS_SPICE_DIR", str(tmp_path / "nospice"))
    p, r = _write_csvs(tmp_path)
    rc = M.main(["--predictions", str(p), "--references", str(r), "--metrics", "spider"])
    assert rc == 2
    assert "stanford-corenlp-3.6.0.jar" in capsys.readouterr().err


def test_cli_help_documents_csv_formats(capsys):
    with pytest.raises(SystemExit):
        M.main(["--help"])
    text = capsys.readouterr().out
    assert "file_name,caption" in text and "caption_1" in text and "download" in text


def test_download_url_comes_from_pycocoevalcap():
    assert download._spice_download_url().endswith("stanford-corenlp-full-2015-12-09.zip")


@pytest.mark.skipif(
    importlib.util.find_spec("aac_metrics") is None, reason="aac-metrics (optional extra) is not installed"
)
def test_matches_aac_metrics_golden_pair():
    from aac_metrics.functional.cider_d import cider_d
    from aac_metrics.functional.rouge_l import rouge_l

    cands = [PREDS[k] for k in "ab"]
    mrefs = [REFS[k] for k in "ab"]
    c, _ = cider_d(cands, mrefs)
    rl, _ = rouge_l(cands, mrefs)
    assert float(c["cider_d"]) == pytest.approx(GOLD_CIDER, abs=1e-6)
    assert float(rl["rouge_l"]) == pytest.approx(GOLD_ROUGE, abs=1e-6)


@needs_java
@pytest.mark.skipif(
    importlib.util.find_spec("aac_metrics") is None, reason="aac-metrics (optional extra) is not installed"
)
def test_matches_aac_metrics_evaluate(tmp_path, monkeypatch):
    """aac-metrics' own evaluate() (PTB tokenisation, METEOR, BLEU, ROUGE-L, CIDEr-D) on a random corpus with
    case and punctuation gives the suite's figures. Its jars are linked from pycocoevalcap (aac-metrics ships
    none) and its Java-version check, which rejects Java 17 although the jars run on it, is bypassed."""
    import random

    from aac_metrics.functional.evaluate import evaluate as aac_evaluate

    # the package's __init__ shadows these module names with functions of the same name
    aac_meteor = importlib.import_module("aac_metrics.functional.meteor")
    aac_tok = importlib.import_module("aac_metrics.utils.tokenization")

    root = M.pycocoevalcap_dir()
    for src, dst in [
        ("tokenizer/stanford-corenlp-3.4.1.jar", "stanford_nlp/stanford-corenlp-3.4.1.jar"),
        ("meteor/meteor-1.5.jar", "meteor/meteor-1.5.jar"),
        ("meteor/data", "meteor/data"),
    ]:
        (tmp_path / "aac-metrics" / dst).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "aac-metrics" / dst).symlink_to(root / src)
    monkeypatch.setattr(aac_meteor, "check_java_path", lambda *_: True)
    monkeypatch.setattr(aac_tok, "check_java_path", lambda *_: True)

    rng = random.Random(0)
    words = "a dog barks man speaks loudly while rain falls on the roof car engine idles Birds chirp".split()

    def sentence() -> str:
        s = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
        return s[0].upper() + s[1:] + rng.choice(["", ".", "!", ", then stops."])

    cands = [sentence() for _ in range(12)]
    mrefs = [[sentence() for _ in range(rng.randint(1, 5))] for _ in cands]
    names = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d"]
    theirs, theirs_clip = aac_evaluate(cands, mrefs, metrics=names, cache_path=str(tmp_path), device="cpu")
    ours, ours_clip = M.evaluate_captions(
        {i: c for i, c in enumerate(cands)},
        {i: r for i, r in enumerate(mrefs)},
        ["bleu", "meteor", "rouge_l", "cider_d"],
        return_per_clip=True,
    )
    for name in names:
        assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-6), name
    for name in ("meteor", "rouge_l", "cider_d"):
        assert [ours_clip[name][i] for i in range(len(cands))] == pytest.approx(theirs_clip[name].tolist(), abs=1e-6), (
            name
        )


def test_download_spice_models_from_a_local_zip(tmp_path):
    """The download path end to end on a file:// URL: the two jars land in lib/, nothing else is left."""
    import zipfile

    from pycocoevalcap.spice.get_stanford_models import CORENLP

    z = tmp_path / "corenlp.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for name in M.CORENLP_JARS:
            zf.writestr(f"{CORENLP}/{name}", f"jar {name}")
        zf.writestr(f"{CORENLP}/other.jar", "not installed")
    spice = tmp_path / "spice"
    got = download.download_spice_models(spice, url=z.as_uri())
    assert [p.name for p in got] == list(M.CORENLP_JARS)
    assert sorted(p.name for p in (spice / "lib").iterdir()) == sorted(M.CORENLP_JARS)
    assert (spice / "lib" / M.CORENLP_JARS[0]).read_text() == f"jar {M.CORENLP_JARS[0]}"
    assert [p.name for p in spice.iterdir()] == ["lib"]  # the zip went to a temporary folder


def test_download_spice_models_bad_zip_and_no_network_name_the_url(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(M.MetricUnavailableError, match="bad.zip: not the CoreNLP"):
        download.download_spice_models(tmp_path / "spice", url=bad.as_uri())
    gone = (tmp_path / "missing.zip").as_uri()
    with pytest.raises(M.MetricUnavailableError, match=f"could not download {gone}.*copy stanford-corenlp"):
        download.download_spice_models(tmp_path / "spice", url=gone)
    assert not list((tmp_path / "spice").glob("lib/*"))


def test_fetch_checks_the_sha256_and_keeps_no_partial_file(tmp_path):
    import hashlib

    src = tmp_path / "model.ckpt"
    src.write_bytes(b"weights" * 1000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    target = tmp_path / "cache" / "model.ckpt"
    with pytest.raises(M.MetricUnavailableError, match="could not download"):
        download.fetch(src.as_uri(), target, "0" * 64)
    assert not target.exists() and not list(target.parent.iterdir())
    assert download.fetch(src.as_uri(), target, sha).read_bytes() == src.read_bytes()


def test_download_command_reports_a_failed_download_in_one_line(tmp_path, monkeypatch, capsys):
    gone = (tmp_path / "corenlp.zip").as_uri()
    monkeypatch.setattr(download, "_spice_download_url", lambda: gone)
    assert M.main(["download", "--only", "spice", "--dir", str(tmp_path / "spice")]) == 2
    err = capsys.readouterr().err
    assert f"{M.DOWNLOAD_COMMAND}: error: could not download {gone}" in err and "Traceback" not in err
    assert not (tmp_path / "spice" / "lib").exists() or not list((tmp_path / "spice" / "lib").iterdir())
    with pytest.raises(SystemExit) as info:
        M.main(["download", "--only", "everything"])
    assert info.value.code == 2 and "--only" in capsys.readouterr().err
