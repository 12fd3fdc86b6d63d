"""Zero-shot dataset readers on tiny fake layouts: parsing, label sets, folds, missing files, malformed metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from zeroshot.datasets import (
    NSYNTH_FAMILIES,
    DatasetError,
    cremad_label,
    read_audioset,
    read_cremad,
    read_esc50,
    read_fsd50k,
    read_gtzan,
    read_manifest_dataset,
    read_nsynth,
    read_us8k,
    read_zeroshot_dataset,
)
from zeroshot.templates import make_prompts


def wav(path: Path, seconds: float = 0.1, sr: int = 16000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sr)).astype(np.float32)
    sf.write(path, x, sr)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- ESC-50

ESC_ROWS = [
    ("1-100032-A-0.wav", 1, 0, "dog"),
    ("1-110389-A-0.wav", 1, 0, "dog"),
    ("2-102414-A-12.wav", 2, 12, "crackling_fire"),
    ("3-100018-A-1.wav", 3, 1, "rooster"),
    ("5-9032-A-12.wav", 5, 12, "crackling_fire"),
]


def esc50(tmp_path: Path, rows=ESC_ROWS, extra: str = "") -> Path:
    root = tmp_path / "ESC-50-master"
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for i, (name, fold, target, cat) in enumerate(rows):
        lines.append(f"{name},{fold},{target},{cat},False,{100000 + i},A")
        wav(root / "audio" / name, seed=i)
    write(root / "meta" / "esc50.csv", "\n".join(lines) + "\n" + extra)
    return root


def test_esc50_classes_folds_labels(tmp_path):
    ds = read_esc50(esc50(tmp_path))
    assert ds.name == "esc50" and not ds.multi_label and ds.rule == "esc50"
    assert ds.classes == ["crackling_fire", "dog", "rooster"]  # sorted, as EVAR (not by target 0, 1, 12)
    assert [c.fold for c in ds.clips] == ["1", "1", "2", "3", "5"]  # every fold kept (EVAR pools them)
    assert [c.labels for c in ds.clips][2] == ["crackling_fire"]
    assert ds.clips[0].path.name == "1-100032-A-0.wav" and ds.clips[0].path.parent.name == "audio"
    assert ds.targets().tolist() == [1, 1, 0, 2, 0]
    assert ds.missing == []
    assert make_prompts(ds.classes, ds.rule) == [
        ["crackling fire can be heard"],
        ["dog can be heard"],
        ["rooster can be heard"],
    ]
    assert [c.fold for c in read_esc50(esc50(tmp_path), folds=["1", 5]).clips] == ["1", "1", "5"]


def test_esc50_missing_files_reported_and_strict(tmp_path, caplog):
    root = esc50(tmp_path)
    gone = root / "audio" / "3-100018-A-1.wav"
    gone.unlink()
    with caplog.at_level("WARNING"):
        ds = read_esc50(root)
    assert ds.missing == [gone] and len(ds.clips) == 4
    assert "1 of 5 audio file(s) missing" in caplog.text and str(gone) in caplog.text
    assert ds.classes == ["crackling_fire", "dog", "rooster"]  # a class keeps its place without its clips
    with pytest.raises(DatasetError, match="3-100018-A-1.wav"):
        read_esc50(root, strict=True)


@pytest.mark.parametrize(
    "extra,match",
    [
        ("4-1.wav,4,0\n", r"esc50\.csv, line 7: 3 field\(s\), expected 7"),
        ("4-1.wav,four,0,dog,False,1,A\n", r"esc50\.csv, line 7: column 'fold' must be an integer, got 'four'"),
        ("4-1.wav,4,0,cat,False,1,A\n", r"esc50\.csv, line 7: class id 0 is 'cat' here but 'dog' earlier"),
    ],
)
def test_esc50_malformed_rows_name_file_and_line(tmp_path, extra, match):
    with pytest.raises(DatasetError, match=match):
        read_esc50(esc50(tmp_path, extra=extra))


def test_esc50_missing_metadata_or_column(tmp_path):
    with pytest.raises(DatasetError, match=r"esc50\.csv: no such file"):
        read_esc50(tmp_path)
    write(tmp_path / "meta" / "esc50.csv", "filename,fold,category\na.wav,1,dog\n")
    with pytest.raises(DatasetError, match=r"esc50\.csv, line 1: missing column\(s\) target"):
        read_esc50(tmp_path)


# ----------------------------------------------------------------------------------------------- US8K


def test_us8k_folders_classes_and_missing(tmp_path):
    root = tmp_path / "UrbanSound8K"
    rows = [
        ("100032-3-0-0.wav", 100032, 5, 3, "dog_bark"),
        ("100263-2-0-117.wav", 100263, 5, 2, "children_playing"),
        ("101415-3-0-2.wav", 101415, 10, 3, "dog_bark"),
        ("102305-6-0-0.wav", 102305, 1, 6, "gun_shot"),
    ]
    lines = ["slice_file_name,fsID,start,end,salience,fold,classID,class"]
    for name, fs, fold, cid, cls in rows:
        lines.append(f"{name},{fs},0.0,0.317,1,{fold},{cid},{cls}")
        if fold != 1:
            wav(root / "audio" / f"fold{fold}" / name)
    write(root / "metadata" / "UrbanSound8K.csv", "\n".join(lines) + "\n")
    ds = read_us8k(root)
    assert ds.classes == ["children_playing", "dog_bark", "gun_shot"]  # classID 2, 3, 6
    assert [(c.path.parent.name, c.fold, c.labels[0]) for c in ds.clips] == [
        ("fold5", "5", "dog_bark"),
        ("fold5", "5", "children_playing"),
        ("fold10", "10", "dog_bark"),
    ]
    assert ds.missing == [root / "audio" / "fold1" / "102305-6-0-0.wav"]
    assert make_prompts(["children_playing"], ds.rule) == [["children playing can be heard"]]
    assert len(read_us8k(root, folds=["10"]).clips) == 1


def test_us8k_malformed_fold(tmp_path):
    write(
        tmp_path / "metadata" / "UrbanSound8K.csv",
        "slice_file_name,fsID,start,end,salience,fold,classID,class\na.wav,1,0,1,1,x,3,dog_bark\n",
    )
    with pytest.raises(DatasetError, match=r"UrbanSound8K\.csv, line 2: column 'fold'"):
        read_us8k(tmp_path)


# ----------------------------------------------------------------------------------------------- GTZAN


@pytest.mark.parametrize("folder", ["genres", "genres_original"])
def test_gtzan_genre_folders(tmp_path, folder):
    for genre in ("blues", "hiphop", "jazz"):
        for i in range(2):
            wav(tmp_path / folder / genre / f"{genre}.0000{i}.wav")
    (tmp_path / folder / "blues" / "notes.txt").write_text("not audio")
    ds = read_gtzan(tmp_path, split="all")
    assert ds.classes == ["blues", "hiphop", "jazz"] and len(ds.clips) == 6
    assert ds.clips[2].labels == ["hiphop"] and ds.clips[2].path.name == "hiphop.00000.wav"
    assert make_prompts(ds.classes, ds.rule)[1] == ["hiphop music can be heard"]


def test_gtzan_split_file(tmp_path):
    for genre in ("blues", "hiphop", "jazz"):
        for i in range(2):
            wav(tmp_path / "genres" / genre / f"{genre}.0000{i}.wav")
    split = write(
        tmp_path / "test_filtered.txt",
        "blues/blues.00001.au\n\nhiphop/hiphop.00000.wav\njazz.00001.wav\njazz/jazz.00054.wav\n",
    )
    ds = read_gtzan(tmp_path, split_file=split)
    assert [(c.labels[0], c.path.name) for c in ds.clips] == [
        ("blues", "blues.00001.wav"),
        ("hiphop", "hiphop.00000.wav"),
        ("jazz", "jazz.00001.wav"),
    ]
    assert ds.classes == ["blues", "hiphop", "jazz"]  # all genres compete, also those not in the split
    assert ds.missing == [tmp_path / "genres" / "jazz" / "jazz.00054.wav"]
    assert all(c.fold == "test_filtered" for c in ds.clips)


def test_gtzan_no_audio(tmp_path):
    (tmp_path / "genres" / "blues").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no audio files"):
        read_gtzan(tmp_path, split="all")


# ----------------------------------------------------------------------------------------------- NSynth


def test_nsynth_examples_json(tmp_path):
    base = tmp_path / "nsynth-test"
    examples = {
        "bass_synthetic_033-022-050": {"instrument_family_str": "bass", "pitch": 22},
        "guitar_acoustic_010-066-100": {"instrument_family_str": "guitar", "pitch": 66},
        "vocal_synthetic_003-088-075": {"instrument_family_str": "vocal", "pitch": 88},
    }
    write(base / "examples.json", json.dumps(examples, indent=2))
    for note in list(examples)[:2]:
        wav(base / "audio" / f"{note}.wav")
    ds = read_nsynth(tmp_path)  # finds nsynth-test/ under the root
    assert ds.classes == list(NSYNTH_FAMILIES)  # all 11 families, synth_lead included, as EVAR
    assert [c.labels for c in ds.clips] == [["bass"], ["guitar"]]
    assert [p.name for p in ds.missing] == ["vocal_synthetic_003-088-075.wav"]
    assert read_nsynth(base).classes == ds.classes  # or the split folder itself
    assert make_prompts(["synth_lead"], ds.rule) == [["the musical instrument sound of synth lead can be heard"]]


def test_nsynth_bad_json_and_entries(tmp_path):
    write(tmp_path / "examples.json", '{\n "a": {"instrument_family_str": "bass"},\n "b": \n}\n')
    with pytest.raises(DatasetError, match=r"examples\.json, line 4: bad JSON"):
        read_nsynth(tmp_path)
    write(tmp_path / "examples.json", '{"a": {"pitch": 3}}')
    with pytest.raises(DatasetError, match="example 'a' has no instrument_family_str"):
        read_nsynth(tmp_path)


# ----------------------------------------------------------------------------------------------- CREMA-D

CREMA = [
    "1001_DFA_ANG_XX.wav",
    "1001_IEO_HAP_HI.wav",
    "1002_TIE_NEU_XX.wav",
    "1091_WSI_SAD_LO.wav",
    "1045_ITS_FEA_MD.wav",
    "1050_MTI_DIS_XX.wav",
]


def test_cremad_labels_from_names(tmp_path):
    for name in CREMA:
        wav(tmp_path / "AudioWAV" / name)
    ds = read_cremad(tmp_path, split="all")
    assert ds.classes == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    assert {c.path.name: c.labels[0] for c in ds.clips} == {n: n.split("_")[2] for n in CREMA}
    assert make_prompts(ds.classes, ds.rule)[0] == ["angry person talking can be heard"]
    assert make_prompts(["SAD"], "a {label} voice", ds.label_names) == [["a sad voice"]]
    assert cremad_label("x/1001_DFA_ANG_XX.wav") == "ANG"
    for bad in ("1001_DFA_XXX_XX.wav", "readme.wav", "1001_DFA_ang_XX.wav"):
        with pytest.raises(DatasetError, match="not a CREMA-D file name"):
            cremad_label(bad)


def test_cremad_split_file(tmp_path):
    for name in CREMA[:4]:
        wav(tmp_path / "AudioWAV" / name)
    split = write(
        tmp_path / "cremad.csv",
        "file_name,label,speaker_id,split\n"
        + "".join(f"AudioWAV/{n},{n[9:12]},{n[:4]},{'test' if i % 2 else 'train'}\n" for i, n in enumerate(CREMA)),
    )
    ds = read_cremad(tmp_path, split_file=split)
    assert [c.path.name for c in ds.clips] == ["1001_IEO_HAP_HI.wav", "1091_WSI_SAD_LO.wav"]
    assert [p.name for p in ds.missing] == ["1050_MTI_DIS_XX.wav"]
    assert len(read_cremad(tmp_path, split_file=split, split="train").clips) == 2
    write(tmp_path / "bad.csv", "file_name,split\n1001_DFA_ANG_XX.wav,test\nnot_a_crema.wav,test\n")
    with pytest.raises(DatasetError, match=r"bad\.csv, line 3: .*not_a_crema\.wav"):
        read_cremad(tmp_path, split_file=tmp_path / "bad.csv")


# ----------------------------------------------------------------------------------------------- FSD50K


def fsd50k(tmp_path: Path, vocab: bool = True, extra: str = "") -> Path:
    gt = tmp_path / "FSD50K.ground_truth"
    write(
        gt / "eval.csv",
        "fname,labels,mids\n"
        '37199,"Electric_guitar,Guitar,Music","/m/02sgy,/m/0342h,/m/04rlf"\n'
        "175151,Bark,/m/05tny_\n"
        '253463,"Bark,Dog","/m/05tny_,/m/0bt9lr"\n' + extra,
    )
    if vocab:
        write(
            gt / "vocabulary.csv",
            "0,Bark,/m/05tny_\n1,Dog,/m/0bt9lr\n2,Electric_guitar,/m/02sgy\n"
            "3,Guitar,/m/0342h\n4,Music,/m/04rlf\n5,Rain,/m/06mb1\n",
        )
    for fname in ("37199", "175151"):
        wav(tmp_path / "FSD50K.eval_audio" / f"{fname}.wav")
    return tmp_path


def test_fsd50k_multi_label(tmp_path):
    ds = read_fsd50k(fsd50k(tmp_path))
    assert ds.multi_label and ds.rule == "fsd50k"
    assert ds.classes == ["Bark", "Dog", "Electric_guitar", "Guitar", "Music", "Rain"]  # sorted
    assert [c.labels for c in ds.clips] == [["Electric_guitar", "Guitar", "Music"], ["Bark"]]
    assert ds.targets().tolist() == [[0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert [p.name for p in ds.missing] == ["253463.wav"]
    assert make_prompts(["Electric_guitar"], ds.rule) == [["Electric guitar can be heard"]]
    assert read_fsd50k(fsd50k(tmp_path / "nv", vocab=False)).classes == [
        "Bark",
        "Dog",
        "Electric_guitar",
        "Guitar",
        "Music",
    ]  # without vocabulary.csv: the labels found


def test_fsd50k_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"eval\.csv, line 5: label\(s\) Cat not in"):
        read_fsd50k(fsd50k(tmp_path, extra="9,Cat,/m/01yrx\n"))
    with pytest.raises(DatasetError, match=r"eval\.csv, line 5: 2 field\(s\), expected 3"):
        read_fsd50k(fsd50k(tmp_path / "b", extra='9,"Bark\n'))


# ----------------------------------------------------------------------------------------------- AudioSet

CLASS_INDEX = (
    'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n'
    '2,/m/0jbk,"Animal"\n3,/m/068hy,"Domestic animals, pets"\n'
)
SEGMENTS = (
    "# Segments csv created Sun Mar  5 10:54:25 2017\n"
    "# num_ytids=3, num_segs=3, num_unique_labels=4, num_positive_labels=5\n"
    "# YTID, start_seconds, end_seconds, positive_labels\n"
    '--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/0jbk"\n'
    '--BfvyPmVMo, 20.000, 30.000, "/m/09x0r"\n'
    '--U7joUcTCo, 0.000, 10.000, "/m/05zppz,/m/09x0r"\n'
)


def test_audioset_segments_and_display_names(tmp_path):
    write(tmp_path / "class_labels_indices.csv", CLASS_INDEX)
    write(tmp_path / "eval_segments.csv", SEGMENTS)
    wav(tmp_path / "audio" / "--4gqARaEJE.wav")
    wav(tmp_path / "audio" / "--BfvyPmVMo.wav")
    ds = read_audioset(tmp_path)
    assert ds.multi_label and ds.classes == ["/m/05zppz", "/m/068hy", "/m/09x0r", "/m/0jbk"]  # sorted MIDs
    assert [c.labels for c in ds.clips] == [["/m/068hy", "/m/0jbk"], ["/m/09x0r"]]
    assert [p.name for p in ds.missing] == ["--U7joUcTCo.wav"]
    assert make_prompts(ds.classes, ds.rule, ds.label_names) == [
        ["Male speech, man speaking can be heard"],
        ["Domestic animals, pets can be heard"],
        ["Speech can be heard"],
        ["Animal can be heard"],
    ]
    # another naming of the files
    wav(tmp_path / "wav" / "Y--BfvyPmVMo_20000.wav")
    ds2 = read_audioset(tmp_path, audio_pattern="wav/Y{ytid}_{start_ms}.wav")
    assert [c.path.name for c in ds2.clips] == ["Y--BfvyPmVMo_20000.wav"] and len(ds2.missing) == 2


def test_audioset_errors(tmp_path):
    write(tmp_path / "class_labels_indices.csv", CLASS_INDEX)
    write(tmp_path / "bad.csv", SEGMENTS + '--abcdefghij, 0.000, 10.000, "/m/unknown"\n')
    with pytest.raises(DatasetError, match=r"bad\.csv, line 7: MID\(s\) /m/unknown not in"):
        read_audioset(tmp_path, segments="bad.csv")
    write(tmp_path / "bad2.csv", SEGMENTS + "--abcdefghij, 0.000\n")
    with pytest.raises(DatasetError, match=r"bad2\.csv, line 7: 2 field\(s\), expected 4"):
        read_audioset(tmp_path, segments="bad2.csv")
    write(tmp_path / "eval_segments.csv", SEGMENTS)
    with pytest.raises(DatasetError, match="unknown field"):
        read_audioset(tmp_path, audio_pattern="{video}.wav")
    (tmp_path / "class_labels_indices.csv").unlink()
    with pytest.raises(DatasetError, match=r"class_labels_indices\.csv: no such file"):
        read_audioset(tmp_path)


# ----------------------------------------------------------------------------------------------- manifests


def manifest(tmp_path: Path) -> Path:
    for name in ("a", "b", "c", "d"):
        wav(tmp_path / "audio" / f"{name}.wav")
    return write(
        tmp_path / "m.csv",
        "audio,labels,category,split\n"
        "audio/a.wav,dog;rain,animal,test\naudio/b.wav,siren,vehicle,test\n"
        "audio/c.wav,rain,weather,train\naudio/d.wav,,animal,test\naudio/e.wav,bell,object,test\n",
    )


def test_manifest_tasks_and_columns(tmp_path, caplog):
    m = manifest(tmp_path)
    single = read_manifest_dataset(m, task="single")
    assert not single.multi_label and single.classes == ["bell", "dog", "rain", "siren"]  # from every split
    assert [c.labels for c in single.clips] == [["dog"], ["siren"]]  # d has no label, e is missing
    assert [p.name for p in single.missing] == ["e.wav"]
    multi = read_manifest_dataset(m)  # auto: a clip has two labels
    assert multi.multi_label and multi.clips[0].labels == ["dog", "rain"]
    every = read_manifest_dataset(m, split="all", task="single")
    assert [c.path.name for c in every.clips] == ["a.wav", "b.wav", "c.wav"]
    other = read_manifest_dataset(m, label_column="category", split=None)
    assert not other.multi_label and other.classes == ["animal", "object", "vehicle", "weather"]
    assert [c.labels[0] for c in other.clips] == ["animal", "vehicle", "weather", "animal"]
    with pytest.raises(DatasetError, match="no column 'genre'"):
        read_manifest_dataset(m, label_column="genre")
    with pytest.raises(DatasetError, match=r"audio/e\.wav|e\.wav"):
        read_manifest_dataset(m, strict=True)


def test_manifest_errors_and_dispatch(tmp_path):
    bad = write(tmp_path / "bad.csv", "audio,labels\na.wav,dog\nb.wav,dog,extra\n")
    with pytest.raises(DatasetError, match=r"bad\.csv, line 3"):
        read_manifest_dataset(bad, split=None)
    with pytest.raises(DatasetError, match="unknown dataset 'esc10'"):
        read_zeroshot_dataset("esc10", tmp_path)
    m = manifest(tmp_path)
    assert read_zeroshot_dataset("manifest", m, split=None, task="single").name == "manifest"  # None -> default (test)
