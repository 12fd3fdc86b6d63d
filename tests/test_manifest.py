"""The manifest format: reading, writing, error messages with file and line, file checks, exclusions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2dclap.data.manifest import (
    ManifestError,
    Record,
    apply_exclusions,
    check_files,
    read_exclusion_list,
    read_manifest,
    write_manifest,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _records(root: Path) -> list[Record]:
    return [
        Record("a", root / "audio" / "a.wav", ["a dog barks", "a dog, then a cat"], ["dog"], "train"),
        Record("b", root / "audio" / "b.wav", ['he says "hi"\nand leaves'], ["speech", "male"], "val"),
        Record("c", root / "elsewhere" / "c.flac", [], [], None),
    ]


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_round_trip(tmp_path, ext):
    recs = _records(tmp_path)
    path = write_manifest(recs, tmp_path / f"m{ext}")
    assert read_manifest(path) == recs
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind


def test_written_csv_layout_and_relative_paths(tmp_path):
    recs = _records(tmp_path)
    path = write_manifest(recs, tmp_path / "m.csv")
    header = path.read_text().splitlines()[0]
    assert header == "id,audio,caption_1,caption_2,labels,split"
    assert "audio/a.wav" in path.read_text()  # inside the manifest's folder: written relative
    outside = Record("z", Path("/abs/z.wav"))
    write_manifest([outside], tmp_path / "n.csv")
    assert read_manifest(tmp_path / "n.csv")[0].audio == Path("/abs/z.wav")


def test_relative_audio_resolved_against_manifest_folder(tmp_path, monkeypatch):
    sub = tmp_path / "meta"
    sub.mkdir()
    _write(sub / "m.csv", "audio,caption\nclips/x.wav,a bell\n")
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    (rec,) = read_manifest(Path("meta/m.csv"))
    assert rec.audio == (sub / "clips" / "x.wav").resolve()
    assert rec.id == "x"  # default id: the file stem
    assert rec.captions == ["a bell"] and rec.labels == [] and rec.split is None


def test_caption_columns_order_labels_and_blank_cells(tmp_path):
    cols = ",".join(f"caption_{i}" for i in (10, 2, 1))
    _write(
        tmp_path / "m.csv",
        f"audio,{cols},labels,split\nx.wav,ten,two,one, a ; b ;;,Validation\n\ny.wav,,,only, ,train\n",
    )
    x, y = read_manifest(tmp_path / "m.csv")
    assert x.captions == ["one", "two", "ten"]  # numeric order, not text order
    assert x.labels == ["a", "b"] and x.split == "val"
    assert y.captions == ["only"] and y.labels == []


def test_jsonl_accepts_lists(tmp_path):
    _write(
        tmp_path / "m.jsonl",
        json.dumps({"audio": "x.wav", "caption": ["c1", "c2"], "labels": ["l1", "l2"], "id": 7}) + "\n\n",
    )
    (rec,) = read_manifest(tmp_path / "m.jsonl")
    assert rec.id == "7" and rec.captions == ["c1", "c2"] and rec.labels == ["l1", "l2"]


def test_split_filter(tmp_path):
    path = write_manifest(_records(tmp_path), tmp_path / "m.csv")
    assert [r.id for r in read_manifest(path, split="train")] == ["a"]
    assert [r.id for r in read_manifest(path, split="validation")] == ["b"]
    with pytest.raises(ManifestError, match="unknown split"):
        read_manifest(path, split="dev")


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("path,caption\nx.wav,a\n", 1, "no 'audio' column"),
        ("audio,caption\nx.wav,a\n ,b\n", 3, "empty 'audio' cell"),
        ("audio,caption\nx.wav,a\ny.wav,b,extra\n", 3, "3 field"),
        ('audio,caption\n"x.wav","two\nlines"\ny.wav\n', 4, "1 field"),  # the quoted field spans lines 2-3
        ("audio,split\nx.wav,train\ny.wav,holdout\n", 3, "unknown split 'holdout'"),
        ("id,audio\nk,x.wav\nj,y.wav\nk,z.wav\n", 4, r"duplicate id 'k' \(first seen on line 2\)"),
        ("audio\nsub/x.wav\nother/x.wav\n", 3, "duplicate id 'x'"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, text, line, message):
    path = _write(tmp_path / "bad_manifest.csv", text)
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(path)
    assert f"bad_manifest.csv, line {line}:" in str(info.value)


@pytest.mark.parametrize(
    "lines, line, message",
    [
        (['{"audio": "x.wav"}', '{"audio": "y.wav",}'], 2, "bad JSON"),
        (['{"audio": "x.wav"}', "", '["y.wav"]'], 3, "expected an object"),
        (['{"audio": "x.wav"}', '{"file": "y.wav"}'], 2, "no 'audio' column"),
        (['{"audio": ""}'], 1, "empty 'audio' cell"),
        (['{"audio": "x.wav", "labels": {"a": 1}}'], 1, "must hold text"),
        (['{"audio": "x.wav"}', '{"audio": "y.wav", "id": "x"}'], 2, "duplicate id 'x'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, line, message):
    path = _write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(path)
    assert f"bad.jsonl, line {line}:" in str(info.value)


@pytest.mark.parametrize("name", ["bad.csv", "bad.jsonl", "exclude.txt"])
def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path, name):
    rows = {
        "bad.csv": [b"audio,caption", b"x.wav,a", b"y.wav,caf\xe9"],
        "bad.jsonl": [b'{"audio": "x.wav"}', b'{"audio": "y.wav", "caption": "caf\xe9"}', b""],
        "exclude.txt": [b"# ids", b"x", b"caf\xe9"],
    }[name]
    path = tmp_path / name
    path.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(ManifestError, match="not UTF-8") as info:
        read_exclusion_list(path) if name.endswith(".txt") else read_manifest(path)
    line = 3 if name != "bad.jsonl" else 2
    assert f"{name}, line {line}:" in str(info.value) and "\\xe9" in str(info.value)


def test_unbalanced_quote_is_an_error_at_its_line(tmp_path):
    path = _write(tmp_path / "q.csv", 'audio,caption\nx.wav,fine\ny.wav,"never closed\nz.wav,c\n')
    with pytest.raises(ManifestError, match="unbalanced quote") as info:
        read_manifest(path)
    assert "q.csv, line 3:" in str(info.value)


def test_ids_are_kept_as_written(tmp_path):
    path = write_manifest(
        [Record("Heat duct ", tmp_path / "Heat duct .wav"), Record(" lead", tmp_path / "l.wav")], tmp_path / "m.csv"
    )
    assert [r.id for r in read_manifest(path)] == ["Heat duct ", " lead"]
    blank = _write(tmp_path / "b.csv", "id,audio\n  ,x.wav\n")
    assert read_manifest(blank)[0].id == "x"  # a blank id cell: the default, the stem


def test_file_level_errors(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "missing.csv")
    with pytest.raises(ManifestError, match="empty manifest"):
        read_manifest(_write(tmp_path / "empty.csv", ""))
    with pytest.raises(ManifestError, match="use .csv or .jsonl"):
        read_manifest(_write(tmp_path / "m.tsv", "audio\nx.wav\n"))
    with pytest.raises(ManifestError, match="duplicate id"):
        write_manifest([Record("a", tmp_path / "1.wav"), Record("a", tmp_path / "2.wav")], tmp_path / "d.csv")


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_manifest(_records(tmp_path), tmp_path / "m.csv")
    before = path.read_bytes()
    with pytest.raises(ManifestError, match="separator"):
        write_manifest([Record("q", tmp_path / "q.wav", labels=["a;b"])], path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_check_files(tmp_path, caplog):
    (tmp_path / "here.wav").write_bytes(b"x")
    recs = [Record("here", tmp_path / "here.wav"), Record("gone", tmp_path / "gone.wav")]
    with caplog.at_level("WARNING"):
        present, missing = check_files(recs)
    assert [r.id for r in present] == ["here"]
    assert missing == [tmp_path / "gone.wav"]
    assert "gone.wav" in caplog.text


def test_exclusions(tmp_path):
    listing = _write(
        tmp_path / "exclude.txt",
        "# clips with licence problems\n"
        "by_id\n"
        "by_name.wav   # trailing comment\n"
        "by_stem\n"
        "\n"
        "setA/dup.wav\n"
        f"{tmp_path}/abs/exact.wav\n"
        "odd#name.wav\n",
    )
    excluded = read_exclusion_list(listing)
    assert "by_name.wav" in excluded and "odd#name.wav" in excluded and len(excluded) == 6

    def rec(rec_id, rel):
        return Record(rec_id, tmp_path / rel)

    recs = [
        rec("by_id", "x/1.wav"),
        rec("n", "x/by_name.wav"),
        rec("s", "x/by_stem.flac"),
        rec("dA", "data/setA/dup.wav"),
        rec("dB", "data/setB/dup.wav"),
        rec("e", "abs/exact.wav"),
        rec("e2", "other/exact.wav"),
        rec("o", "x/odd#name.wav"),
        rec("keep", "x/keep.wav"),
    ]
    kept, n_removed = apply_exclusions(recs, excluded)
    assert n_removed == 6
    assert [r.id for r in kept] == ["dB", "e2", "keep"]  # a listed path does not exclude same-named files elsewhere
    with pytest.raises(ManifestError, match="no such exclusion list"):
        read_exclusion_list(tmp_path / "nope.txt")
