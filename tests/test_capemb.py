"""Caption-embedding files: the official .npy dict read without unrestricted unpickling, and .npz."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from m2dclap.data.capemb import CaptionEmbeddingError, load_caption_embeddings, save_caption_embeddings


def _emb():
    rng = np.random.default_rng(0)
    return {
        "YTid0000001": rng.standard_normal(8).astype(np.float32),
        "YTid0000002": rng.standard_normal((4, 8)).astype(np.float32),
    }


def _write_npy_payload(path, obj, protocol):
    """A .npy object array written by hand, with the pickle protocol of our choice."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(arr, f, protocol=protocol)
    return path


def test_round_trip_official_form(tmp_path):
    emb = _emb()
    path = save_caption_embeddings(emb, tmp_path / "capemb.npy")
    loaded = load_caption_embeddings(path)
    assert set(loaded) == set(emb)
    for k, v in emb.items():
        assert loaded[k].dtype == np.float16 and loaded[k].shape == v.shape
        np.testing.assert_allclose(loaded[k], v, atol=2e-3, rtol=1e-3)
    # the file is what the official code expects: np.load(allow_pickle=True).item() gives the dict
    official = np.load(path, allow_pickle=True).item()
    assert set(official) == set(emb)
    assert [p.name for p in tmp_path.iterdir()] == ["capemb.npy"]  # no temporary file left


def test_reads_files_written_by_np_save_and_old_numpy(tmp_path):
    emb = {k: v.astype(np.float16) for k, v in _emb().items()}
    np.save(tmp_path / "direct.npy", emb)
    assert set(load_caption_embeddings(tmp_path / "direct.npy")) == set(emb)
    # protocol 2 (bytes as _codecs.encode) with the module names of numpy 1.x (numpy.core.multiarray) and of
    # numpy 2 (numpy._core.multiarray), whichever numpy wrote the file
    path = _write_npy_payload(tmp_path / "p2.npy", emb, protocol=2)
    raw = path.read_bytes()
    assert b"_codecs" in raw
    names = (b"numpy.core.multiarray\n", b"numpy._core.multiarray\n")
    written = next(n for n in names if n in raw)
    for name in names:
        path.write_bytes(raw.replace(written, name))
        loaded = load_caption_embeddings(path)
        np.testing.assert_array_equal(loaded["YTid0000002"], emb["YTid0000002"])


def test_npz(tmp_path):
    emb = _emb()
    np.savez(tmp_path / "e.npz", **emb)
    loaded = load_caption_embeddings(tmp_path / "e.npz")
    np.testing.assert_array_equal(loaded["YTid0000001"], emb["YTid0000001"])


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalEvil:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, protocol):
    pwned = tmp_path / "pwned"
    payload = {"ok": np.zeros(4, np.float16), "evil": _Evil(f"touch {pwned}")}
    path = _write_npy_payload(tmp_path / "capemb_evil.npy", payload, protocol)
    with pytest.raises(CaptionEmbeddingError, match=r"refused to unpickle the global '(posix|nt)\.system'") as info:
        load_caption_embeddings(path)
    assert "capemb_evil.npy" in str(info.value)
    assert not pwned.exists()

    np.save(tmp_path / "eval.npy", {"x": _EvalEvil(f"open({str(pwned)!r}, 'w')")}, allow_pickle=True)
    with pytest.raises(CaptionEmbeddingError, match="builtins.eval"):
        load_caption_embeddings(tmp_path / "eval.npy")
    assert not pwned.exists()


def test_codecs_only_for_latin1(tmp_path):
    # a hand-made protocol-2 pickle calling _codecs.encode with another codec is refused
    data = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x05\x00\x00\x00rot13q\x02\x86q\x03Rq\x04."
    path = tmp_path / "codec.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(data)
    with pytest.raises(CaptionEmbeddingError, match="rot13"):
        load_caption_embeddings(path)


def test_bad_files_are_named(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((3, 8), np.float16))
    with pytest.raises(CaptionEmbeddingError, match="plain.npy: holds a plain float16 array"):
        load_caption_embeddings(tmp_path / "plain.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(CaptionEmbeddingError, match="junk.npy: not a .npy file"):
        load_caption_embeddings(tmp_path / "junk.npy")
    good = save_caption_embeddings(_emb(), tmp_path / "good.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(good[:-40])
    with pytest.raises(CaptionEmbeddingError, match="cut.npy: cannot read the pickled payload"):
        load_caption_embeddings(tmp_path / "cut.npy")
    np.save(tmp_path / "cube.npy", {"a": np.zeros((2, 2, 2), np.float16)})
    with pytest.raises(CaptionEmbeddingError, match=r"cube.npy: embedding of 'a'"):
        load_caption_embeddings(tmp_path / "cube.npy")
    np.save(tmp_path / "widths.npy", {"a": np.zeros(8, np.float16), "b": np.zeros(6, np.float16)})
    with pytest.raises(CaptionEmbeddingError, match="different widths"):
        load_caption_embeddings(tmp_path / "widths.npy")
    np.save(tmp_path / "list.npy", np.array([1, "a"], dtype=object))
    with pytest.raises(CaptionEmbeddingError, match="expected a dict"):
        load_caption_embeddings(tmp_path / "list.npy")
    with pytest.raises(CaptionEmbeddingError, match="no such"):
        load_caption_embeddings(tmp_path / "absent.npy")


# ----------------------------------------------------------------------------------------------- the command
def _manifest(tmp_path, rows):
    import soundfile as sf

    from conftest import tone

    lines = ["audio,caption_1,caption_2,split"]
    for name, caps, split in rows:
        sf.write(tmp_path / f"{name}.wav", tone(0.5).numpy(), 16000)
        lines.append(f"{name}.wav,{caps[0]},{caps[1]},{split}")
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_embed_captions_command_writes_the_official_dict(tmp_path, minilm, capsys):
    from m2dclap.embed_captions import main

    manifest = _manifest(
        tmp_path, [("a", ("a dog barks", "barking"), "train"), ("b", ("rain falls", "rain on a roof"), "test")]
    )
    out = tmp_path / "emb.npy"
    assert main([str(manifest), "--out", str(out), "--model", minilm, "--split", "train", "--quiet"]) == 0
    emb = load_caption_embeddings(out)
    assert list(emb) == ["a"] and emb["a"].shape == (2, 384)


@pytest.mark.parametrize("case", ["missing-manifest", "no-captions", "bad-split"])
def test_embed_captions_command_bad_input_exits_2_naming_it(case, tmp_path, capsys):
    from m2dclap.embed_captions import main

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "emb.npy").write_bytes(b"an earlier result")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    manifest = tmp_path / "m.csv"
    if case == "no-captions":
        manifest.write_text("audio,split\nx.wav,train\n", encoding="utf-8")
    argv = [str(manifest), "--out", str(out_dir / "emb.npy"), "--quiet"]
    if case == "bad-split":
        with pytest.raises(SystemExit) as info:
            main(argv + ["--split", "dev"])
        assert info.value.code == 2 and "--split" in capsys.readouterr().err
    else:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(manifest) in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
