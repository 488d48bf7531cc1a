"""prepare.py: every source form, the split, the filters and their counts, resume after an
interruption (an exception in mid-write and a killed process), bad input, the noise bank, bounded
memory and the espeak-ng demo. Tokens are checked against openai-whisper's own tokenizer, audio
against soundfile and dualwhisper.load_audio."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

import dualwhisper as dw
import prepare as pp
from conftest import IN_CI, ROOT, need

TEXTS = ["The cat sat on the mat.", "  Rain again,\n and   wind. ", "Seven apples for a penny!", "Where is the station?",
         "I like green tea.", "Snow fell all night long."]
SPLIT_FILES = ("audio.bin", "tokens.bin", "jsonl", "index.npy")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def clip(seed, seconds=0.3, sr=16000, channels=1):
    """Noise-like int16 samples, different for every seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(-9000, 9000, size=(int(seconds * sr), channels) if channels > 1 else int(seconds * sr)).astype(np.int16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six clips: five 16 kHz mono 16-bit wavs, and one 22.05 kHz stereo flac (resampled, mixed down)."""
    folder = tmp_path_factory.mktemp("corpus")
    rows = []
    for i, text in enumerate(TEXTS):
        name = f"clips/c{i}.wav" if i < 5 else f"clips/c{i}.flac"
        (folder / "clips").mkdir(exist_ok=True)
        if i < 5:
            sf.write(folder / name, clip(i, 0.2 + 0.05 * i), 16000, subtype="PCM_16")
        else:
            sf.write(folder / name, clip(i, 0.4, 22050, channels=2), 22050, subtype="PCM_16")
        rows.append({"path": name, "text": text})
    return SimpleNamespace(folder=folder, rows=rows)


def write_manifest(folder, form, rows):
    """The same rows as a JSON list, JSON lines, CSV, TSV or .txt files beside the audio."""
    if form == "txt":
        for r in rows:
            (folder / r["path"]).with_suffix(".txt").write_text(r["text"], encoding="utf-8")
        return folder
    path = folder / f"manifest.{form}"
    with open(path, "w", encoding="utf-8", newline="") as f:
        if form == "json":
            json.dump(rows, f, ensure_ascii=False)
        elif form == "jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if form == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    return path


def run(*args, workers=0, checkpoint_every=0):
    return pp.main([str(a) for a in args] + ["--workers", str(workers), "--checkpoint_every", str(checkpoint_every)])


def contents(folder, split):
    s = pp.PreparedSplit(folder, split)
    return {s.row(i)["id"]: (s.row(i)["text"], s.row(i)["language"], s.audio(i).copy(), s.tokens(i).tolist()) for i in range(len(s))}


def split_bytes(folder, splits=("train", "val")):
    return {f"{s}.{k}": (Path(folder) / f"{s}.{k}").read_bytes() for s in splits for k in SPLIT_FILES}


def whisper_tokens(text, multilingual=False, language=None, task="transcribe"):
    """The reference: openai-whisper's tokenizer, prompt + text + <|endoftext|>."""
    whisper = need("whisper")
    tok = whisper.tokenizer.get_tokenizer(multilingual, num_languages=99, language=language, task=task)
    return list(tok.sot_sequence_including_notimestamps) + tok.encode(" " + " ".join(text.split())) + [tok.eot]


# -----------------------------------------------------------------------------
# sources


@pytest.mark.parametrize("form", ["json", "jsonl", "csv", "tsv", "txt"])
def test_local_folder_in_every_manifest_form(corpus, tmp_path, tiny_en_dir, form):
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(corpus.folder / "clips", folder / "clips", target_is_directory=True)
    source = write_manifest(folder, form, corpus.rows)
    assert run("--input", source, "--out", tmp_path / "out", "--model", tiny_en_dir) == 0
    got = {**contents(tmp_path / "out", "train"), **contents(tmp_path / "out", "val")}
    assert sorted(got) == [f"clips/c{i}" for i in range(6)]
    for i, r in enumerate(corpus.rows):
        text, language, audio, tokens = got[f"clips/c{i}"]
        assert text == " ".join(r["text"].split()) and language == "en"
        assert tokens == whisper_tokens(r["text"])  # English-only: <|startoftranscript|> <|notimestamps|> text <|endoftext|>
        if i < 5:  # 16 kHz 16-bit input is kept bit for bit
            np.testing.assert_array_equal(audio, sf.read(corpus.folder / r["path"], dtype="int16")[0])
        else:  # resampled and mixed down exactly as dualwhisper.load_audio does it
            ref = dw.load_audio(corpus.folder / r["path"])
            assert len(audio) == len(ref) == round(0.4 * 16000)
            assert np.abs(audio / 32768 - ref).max() <= 1 / 32768
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["jobs"]["speech"]["kept"] == 6 and meta["splits"]["train"]["clips"] + meta["splits"]["val"]["clips"] == 6
    assert meta["tokenizer"]["n_vocab"] == 51864 and not meta["tokenizer"]["multilingual"]
    hours = sum(len(v[2]) for v in got.values()) / 16000 / 3600
    assert abs(meta["splits"]["train"]["hours"] + meta["splits"]["val"]["hours"] - hours) < 1e-5


def test_multilingual_prompts_and_per_row_languages(corpus, tmp_path, multilingual_tokenizer_dir):
    rows = [dict(r, language=lang) for r, lang in zip(corpus.rows, ["az", "en", "Azerbaijani", "", "xx", "tr"])]
    manifest = write_manifest(corpus.folder, "csv", rows)
    assert run("--input", manifest, "--out", tmp_path / "out", "--model", multilingual_tokenizer_dir, "--language", "az",
               "--val_fraction", 0) == 0
    got = contents(tmp_path / "out", "train")
    expect = {"clips/c0": "az", "clips/c1": "en", "clips/c2": "az", "clips/c3": "az", "clips/c5": "tr"}  # c3: --language
    assert {k: v[1] for k, v in got.items()} == expect
    for uid, lang in expect.items():
        assert got[uid][3] == whisper_tokens(got[uid][0], True, lang)  # <|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["jobs"]["speech"]["dropped"] == {"unsupported_language": 1}  # xx
    assert meta["splits"]["train"]["languages"] == {"az": 3, "en": 1, "tr": 1} and meta["splits"]["val"]["clips"] == 0

    assert run("--input", manifest, "--out", tmp_path / "tr", "--model", multilingual_tokenizer_dir, "--task", "translate",
               "--language", "az", "--val_fraction", 0) == 0
    got = contents(tmp_path / "tr", "train")
    assert got["clips/c0"][3] == whisper_tokens(got["clips/c0"][0], True, "az", "translate")


@pytest.mark.parametrize("column", ["speaker", "client_id", "voice"])
def test_speakers_are_kept_for_packing(corpus, tmp_path, tiny_en_dir, column):
    """A manifest's speaker column (any of its usual names) reaches the prepared rows; a row without one has none."""
    rows = [dict(r, **{column: f"p{i % 2}" if i != 3 else ""}) for i, r in enumerate(corpus.rows)]
    manifest = write_manifest(corpus.folder, "csv", rows)
    assert run("--input", manifest, "--out", tmp_path / "out", "--model", tiny_en_dir, "--val_fraction", 0) == 0
    split = pp.PreparedSplit(tmp_path / "out", "train")
    got = {split.row(i)["id"]: split.row(i).get("speaker") for i in range(len(split))}
    assert got == {f"clips/c{i}": (f"p{i % 2}" if i != 3 else None) for i in range(6)}


def encoded(samples, sr, fmt):
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory):
    """A dataset laid out as Hugging Face stores it: data/{split}-0000i-of-0000n.parquet with an audio
    column of {bytes, path} structs (wav and flac bytes) and a text column. Train holds 7 good rows
    and 3 bad ones (corrupt bytes, no bytes, empty text); a test shard must be left alone."""
    pa = need("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("hf")
    (folder / "data").mkdir()
    good = [(encoded(clip(100 + i, 0.3), 16000, "WAV") if i % 2 else encoded(clip(100 + i, 0.3, 8000), 8000, "FLAC"), f"row {i} text")
            for i in range(7)]
    bad = [(b"RIFF\x00\x00not really a wav", "corrupt"), (None, "no audio"), (encoded(clip(99), 16000, "WAV"), "   ")]
    rows = good[:4] + bad + good[4:]
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name, part in [("train-00000-of-00002", rows[:6]), ("train-00001-of-00002", rows[6:]), ("test-00000-of-00001", good[:2])]:
        table = pa.table({"audio": pa.array([{"bytes": b, "path": f"{k}.wav"} for k, (b, _) in enumerate(part)], audio_type),
                          "text": [t for _, t in part], "client_id": [f"speaker {k % 3}" for k in range(len(part))]})
        pq.write_table(table, folder / "data" / f"{name}.parquet", row_group_size=2)
    return SimpleNamespace(folder=folder, good=good)


def test_parquet_folder_like_hugging_face(parquet_dataset, tmp_path, tiny_en_dir, capsys):
    assert run("--hf_dataset", parquet_dataset.folder, "--out", tmp_path / "out", "--model", tiny_en_dir, "--val_fraction", 0) == 0
    got = contents(tmp_path / "out", "train")
    assert list(got) == [f"train-00000-of-00002/{r}" for r in (0, 1, 2, 3)] + [f"train-00001-of-00002/{r}" for r in (1, 2, 3)]
    for (text, _, audio, tokens), (data, ref_text) in zip(got.values(), parquet_dataset.good):
        assert text == ref_text and tokens == whisper_tokens(ref_text)
        samples, sr = sf.read(io.BytesIO(data), dtype="float32")
        ref = dw.resample(samples, sr, 16000)
        assert len(audio) == len(ref) and np.abs(audio / 32768 - ref).max() <= 1 / 32768
    split = pp.PreparedSplit(tmp_path / "out", "train")
    assert all("speaker" not in split.row(i) for i in range(len(split))), "speakers only when a column is named"
    assert run("--hf_dataset", parquet_dataset.folder, "--out", tmp_path / "speakers", "--model", tiny_en_dir, "--val_fraction", 0,
               "--hf_speaker_column", "client_id") == 0
    split = pp.PreparedSplit(tmp_path / "speakers", "train")
    assert [split.row(i)["speaker"] for i in range(len(split))] == [f"speaker {k % 3}" for k in (0, 1, 2, 3)] + [f"speaker {k % 3}" for k in (1, 2, 3)]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["jobs"]["speech"]["dropped"] == {"undecodable_audio": 1, "missing_audio": 1, "empty_text": 1}
    assert meta["jobs"]["speech"]["seen"] == 10
    assert "10 rows seen, 7 kept" in capsys.readouterr().out
    # a resume from any saved position yields exactly the rows after it (row groups of 2 are skipped whole)
    source = pp.ParquetSource(str(parquet_dataset.folder))
    every = [(tuple(c), item and item["id"]) for c, item in source.items()]
    assert len(every) == 12 and every[-1] == ((2, 0), None)  # 10 rows and one end-of-shard marker per shard
    for k, (cursor, _) in enumerate(every):
        assert [(tuple(c), item and item["id"]) for c, item in source.items(list(cursor))] == every[k + 1:]


def test_hub_dataset_is_fetched_shard_by_shard(parquet_dataset, tmp_path, tiny_en_dir, monkeypatch):
    """The hub path with huggingface_hub replaced by a stand-in serving the local shards: each shard is
    downloaded once, at most two are on disk at a time, and none is left behind."""
    hub = need("huggingface_hub")
    shards = sorted(p.relative_to(parquet_dataset.folder).as_posix() for p in parquet_dataset.folder.rglob("*.parquet"))
    fetched, most_on_disk = [], [0]

    class FakeApi:
        def dataset_info(self, repo_id, revision=None):
            assert repo_id == "someone/asr"
            return SimpleNamespace(sha="c0ffee", siblings=[SimpleNamespace(rfilename=f) for f in shards + ["README.md"]])

    def fake_download(repo_id, filename, repo_type=None, revision=None, local_dir=None):
        assert (repo_id, repo_type, revision) == ("someone/asr", "dataset", "c0ffee")
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((parquet_dataset.folder / filename).read_bytes())
        fetched.append(filename)
        most_on_disk[0] = max(most_on_disk[0], len(list(Path(local_dir).rglob("*.parquet"))))
        return str(dest)

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    assert run("--hf_dataset", "someone/asr", "--out", tmp_path / "hub", "--model", tiny_en_dir, "--val_fraction", 0) == 0
    assert fetched == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert most_on_disk[0] <= 2 and not list((tmp_path / "hub").rglob("*.parquet"))
    assert run("--hf_dataset", parquet_dataset.folder, "--out", tmp_path / "local", "--model", tiny_en_dir, "--val_fraction", 0) == 0
    assert split_bytes(tmp_path / "hub") == split_bytes(tmp_path / "local")
    assert json.loads((tmp_path / "hub" / "meta.json").read_text())["jobs"]["speech"]["source"] == "someone/asr split train at c0ffee"


# -----------------------------------------------------------------------------
# split, filters


def test_split_is_a_deterministic_function_of_the_id(corpus, tmp_path, tiny_en_dir):
    ids = [f"spk{i % 37}/utt{i}" for i in range(20000)]
    val = [u for u in ids if pp.split_of(u, 0.1) == "val"]
    assert 0.09 < len(val) / len(ids) < 0.11
    assert all(pp.split_of(u, 0.1) == "val" for u in val[:100]) and {pp.split_of(u, 0.0) for u in ids[:500]} == {"train"}
    assert {pp.split_of(u, 1.0) for u in ids[:500]} == {"val"}
    # the same ids land in the same splits when the dataset is reordered and cut down
    many = [{"path": r["path"], "text": r["text"], "id": f"u{k}-{i}"} for k in range(8) for i, r in enumerate(corpus.rows)]
    full = write_manifest(corpus.folder, "jsonl", many)
    assert run("--input", full, "--out", tmp_path / "a", "--model", tiny_en_dir, "--val_fraction", 0.3) == 0
    subset = write_manifest(corpus.folder, "json", many[::-1][::2])
    assert run("--input", subset, "--out", tmp_path / "b", "--model", tiny_en_dir, "--val_fraction", 0.3) == 0
    a_val, b_val = contents(tmp_path / "a", "val"), contents(tmp_path / "b", "val")
    assert 0 < len(a_val) < len(many) and set(b_val) == set(a_val) & {r["id"] for r in many[::-1][::2]}
    assert set(contents(tmp_path / "a", "train")) == {r["id"] for r in many} - set(a_val)


def test_filters_and_bad_rows_are_skipped_and_counted(tmp_path, tiny_en_dir, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "ok1.wav", clip(1), 16000, subtype="PCM_16")
    sf.write(folder / "ok2.wav", clip(2), 16000, subtype="PCM_16")
    sf.write(folder / "long.wav", clip(3, 30.5, 4000), 4000, subtype="PCM_16")  # 30.5 s
    (folder / "corrupt.wav").write_bytes(b"RIFF$\x00\x00\x00WAVEfmt garbage" * 3)
    sf.write(folder / "empty.wav", np.zeros(0, np.int16), 16000, subtype="PCM_16")
    rows = [("ok1.wav", "fine"), ("ok2.wav", "also fine"), ("long.wav", "too long"), ("corrupt.wav", "corrupt"),
            ("empty.wav", "no samples"), ("gone.wav", "missing file"), ("ok1.wav", " \t "), ("ok1.wav", None),
            ("ok1.wav", "word " * 500), ("ok1.wav", "fr")]
    lines = [json.dumps({"id": f"r{i}", "path": p, "text": t, **({"language": t} if t == "fr" else {})}) for i, (p, t) in enumerate(rows)]
    lines += ['{"id": "r10", "path": "ok1.wav", "text": "not closed', json.dumps({"id": "r11", "text": "no path"})]
    raw = "\n".join(lines).encode() + b'\n{"id": "r12", "path": "ok2.wav", "text": "caf\xe9 in latin-1"}\n'
    (folder / "manifest.jsonl").write_bytes(raw)
    assert run("--input", folder, "--out", tmp_path / "out", "--model", tiny_en_dir, "--val_fraction", 0) == 0
    got = contents(tmp_path / "out", "train")
    assert [v[0] for v in got.values()] == ["fine", "also fine"]
    job = json.loads((tmp_path / "out" / "meta.json").read_text())["jobs"]["speech"]
    assert job["dropped"] == {"too_long_audio": 1, "undecodable_audio": 2, "missing_audio": 1, "empty_text": 2,
                              "too_long_text": 1, "unsupported_language": 1, "bad_row": 2, "bad_text": 1}
    assert (job["seen"], job["kept"]) == (13, 2)
    report = capsys.readouterr().out
    assert "13 rows seen, 2 kept" in report and "11 dropped" in report and "bad_text 1" in report


def test_txt_transcripts_missing_or_not_utf8(tmp_path, tiny_en_dir):
    for name in ("a", "b", "c"):
        sf.write(tmp_path / f"{name}.wav", clip(ord(name)), 16000, subtype="PCM_16")
    (tmp_path / "a.txt").write_text("héllo wörld", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("héllo".encode("latin-1"))
    assert run("--input", tmp_path, "--out", tmp_path / "out", "--model", tiny_en_dir, "--val_fraction", 0) == 0
    assert {k: v[0] for k, v in contents(tmp_path / "out", "train").items()} == {"a": "héllo wörld"}
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["jobs"]["speech"]["dropped"] == {"bad_text": 1, "missing_text": 1}
    source = pp.LocalSource(tmp_path)
    every = [(c, item["id"], item.get("error")) for c, item in source.items()]
    assert every == [(1, "a", None), (2, "b", None), (3, "c", "missing_text")]
    assert [(c, item["id"]) for c, item in source.items(1)] == [(2, "b"), (3, "c")]


def test_a_json_manifest_is_a_list_or_json_lines(tmp_path):
    rows = [{"audio_path": "a.wav", "text": "one"}, {"audio_path": "b.wav", "text": "two"}]
    for name, text, n in (("list.json", json.dumps(rows), 2), ("lines.json", "".join(json.dumps(r) + "\n" for r in rows), 2),
                          ("one.json", json.dumps(rows[0]), 1)):
        (tmp_path / name).write_text(text)
        items = [item for _, item in pp.LocalSource(tmp_path / name).items()]
        assert [(item["audio"], item["text"]) for item in items] == [(str(tmp_path / r["audio_path"]), r["text"]) for r in rows[:n]]


# -----------------------------------------------------------------------------
# resume, never half-written


@pytest.fixture
def twelve(corpus, tmp_path):
    rows = [{"path": r["path"], "text": f"{r['text']} {k}", "id": f"u{k}-{i}"} for k in range(2) for i, r in enumerate(corpus.rows)]
    return write_manifest(corpus.folder, "jsonl", rows)


def test_resume_after_a_crash_in_mid_write(twelve, corpus, tmp_path, tiny_en_dir, monkeypatch, capsys):
    args = ("--input", twelve, "--model", tiny_en_dir, "--val_fraction", 0.25)
    assert run(*args, "--out", tmp_path / "clean") == 0
    # an older, complete preparation of another source sits in the folder we write into
    out = tmp_path / "out"
    assert run("--input", write_manifest(corpus.folder, "tsv", corpus.rows), "--out", out, "--model", tiny_en_dir) == 0
    old = split_bytes(out)

    add, calls = pp.SplitWriter.add, [0]

    def crashing_add(self, audio, tokens, row):
        calls[0] += 1
        if calls[0] == 8:  # half a clip on disk, then the crash
            self.files["audio.bin"].write(np.asarray(audio, "<i2").tobytes())
            raise RuntimeError("power cut")
        add(self, audio, tokens, row)

    monkeypatch.setattr(pp.SplitWriter, "add", crashing_add)
    with pytest.raises(RuntimeError, match="power cut"):
        run(*args, "--out", out)
    assert split_bytes(out) == old  # the old data is untouched and still reads
    assert len(pp.PreparedSplit(out, "train")) + len(pp.PreparedSplit(out, "val")) == 6
    state = json.loads((out / ".prepare-speech" / "state.json").read_text())
    assert state["cursor"] == 7 and state["counts"]["kept"] == 7

    monkeypatch.setattr(pp.SplitWriter, "add", add)
    capsys.readouterr()
    assert run(*args, "--out", out) == 0
    assert "resuming after 7 rows" in capsys.readouterr().out
    assert split_bytes(out) == split_bytes(tmp_path / "clean")
    strip = lambda m: {k: v for k, v in m["jobs"]["speech"].items() if k != "seconds"}  # noqa: E731
    meta, clean = (json.loads((d / "meta.json").read_text()) for d in (out, tmp_path / "clean"))
    assert strip(meta) == strip(clean) and meta["splits"] == clean["splits"]
    assert not (out / ".prepare-speech").exists()
    # run again: nothing to do, nothing touched
    mtime = (out / "train.audio.bin").stat().st_mtime_ns
    assert run(*args, "--out", out) == 0 and "prepared already" in capsys.readouterr().out
    assert (out / "train.audio.bin").stat().st_mtime_ns == mtime


def test_resume_while_publishing(twelve, tmp_path, tiny_en_dir, monkeypatch, capsys):
    """Interrupted between renaming the finished splits into place: the run after completes it."""
    args = ("--input", twelve, "--model", tiny_en_dir, "--val_fraction", 0.25)
    publish = pp.publish_split

    def full_disk_at_val(work, folder, split):
        if split == "val":
            raise OSError(28, "No space left on device")
        publish(work, folder, split)

    monkeypatch.setattr(pp, "publish_split", full_disk_at_val)
    assert run(*args, "--out", tmp_path / "out") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert (tmp_path / "out" / "train.index.npy").exists() and not (tmp_path / "out" / "val.index.npy").exists()
    assert not (tmp_path / "out" / "meta.json").exists()
    monkeypatch.setattr(pp, "publish_split", publish)
    assert run(*args, "--out", tmp_path / "out") == 0
    assert run(*args, "--out", tmp_path / "clean") == 0
    assert split_bytes(tmp_path / "out") == split_bytes(tmp_path / "clean")
    assert not (tmp_path / "out" / ".prepare-speech").exists()


KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import prepare
add, calls = prepare.SplitWriter.add, [0]
def dying_add(self, *args):
    calls[0] += 1
    if calls[0] == 9:
        os.killpg(0, signal.SIGKILL)  # this process and its decoding workers, at once
    add(self, *args)
prepare.SplitWriter.add = dying_add
sys.exit(prepare.main({argv!r}))
"""


def test_resume_after_the_process_is_killed(twelve, tmp_path, tiny_en_dir, capsys):
    args = ["--input", str(twelve), "--model", str(tiny_en_dir), "--val_fraction", "0.25", "--out", str(tmp_path / "out")]
    script = KILLED.format(root=str(ROOT), argv=args + ["--workers", "2", "--checkpoint_every", "0"])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, start_new_session=True,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "out" / "train.index.npy").exists() and (tmp_path / "out" / ".prepare-speech" / "state.json").exists()
    assert run(*args) == 0
    assert "resuming after 8 rows" in capsys.readouterr().out
    assert run("--input", twelve, "--model", tiny_en_dir, "--val_fraction", 0.25, "--out", tmp_path / "clean") == 0
    assert split_bytes(tmp_path / "out") == split_bytes(tmp_path / "clean")


def test_a_changed_source_does_not_resume_into_old_progress(twelve, corpus, tmp_path, tiny_en_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    real_add, calls = pp.SplitWriter.add, [0]

    def stop_at_4(self, *a):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("stop")
        real_add(self, *a)

    monkeypatch.setattr(pp.SplitWriter, "add", stop_at_4)
    with pytest.raises(RuntimeError):
        run("--input", twelve, "--out", out, "--model", tiny_en_dir)
    monkeypatch.setattr(pp.SplitWriter, "add", real_add)
    other = write_manifest(corpus.folder, "csv", corpus.rows)
    capsys.readouterr()
    assert run("--input", other, "--out", out, "--model", tiny_en_dir) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prepare.py: error:") and "--restart" in err and "\n" not in err
    assert run("--input", other, "--out", out, "--model", tiny_en_dir, "--restart") == 0
    assert len(contents(out, "train")) + len(contents(out, "val")) == 6


# -----------------------------------------------------------------------------
# bad input: one line, exit status 2, nothing written


@pytest.mark.parametrize("case", ["columns", "no_input", "no_shards", "parquet_columns", "model", "english_only", "no_language",
                                  "two_sources", "val_fraction", "max_seconds", "locked"])
def test_bad_input_is_one_clear_line(case, corpus, parquet_dataset, tmp_path, tiny_en_dir, multilingual_tokenizer_dir, capsys):
    out = tmp_path / "out"
    base = ["--out", out, "--model", tiny_en_dir]
    good = write_manifest(corpus.folder, "csv", corpus.rows)
    if case == "columns":
        (tmp_path / "m.csv").write_text("file_name,words\nclips/c0.wav,hello\n")
        args, expect = ["--input", tmp_path / "m.csv"], "no audio path column"
    elif case == "no_input":
        args, expect = ["--input", tmp_path / "nowhere"], "input not found"
    elif case == "no_shards":
        args, expect = ["--hf_dataset", parquet_dataset.folder, "--hf_split", "validation"], "no parquet shards of split 'validation'"
    elif case == "parquet_columns":
        args, expect = ["--hf_dataset", parquet_dataset.folder, "--hf_text_column", "sentence"], "no column 'sentence'"
    elif case == "model":
        args, expect = ["--input", good, "--model", tmp_path / "no-model"], "tokenizer folder not found"
    elif case == "english_only":
        args, expect = ["--input", good, "--language", "az"], "English-only"
    elif case == "no_language":
        args, expect = ["--input", good, "--model", multilingual_tokenizer_dir], "needs each clip's language"
    elif case == "two_sources":
        args, expect = ["--input", good, "--hf_dataset", parquet_dataset.folder], "give one speech source"
    elif case == "val_fraction":
        args, expect = ["--input", good, "--val_fraction", 1.5], "--val_fraction must be between 0 and 1"
    elif case == "max_seconds":
        args, expect = ["--input", good, "--max_seconds", 0], "--max_seconds must be positive"
    else:
        out.mkdir()
        args, expect = ["--input", good], "another prepare.py is writing"
    if case == "locked":
        with pp._Lock(out):
            rc = run(*base, *args)
    else:
        rc = run(*base, *args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("prepare.py: error:") and expect in err and "\n" not in err, err
    assert not any(out.glob("*.index.npy")) and not (out / "meta.json").exists()


# -----------------------------------------------------------------------------
# noise bank, reading, memory


def test_noise_bank_is_cut_into_pieces_and_added_beside_speech(corpus, tmp_path, tiny_en_dir):
    out = tmp_path / "out"
    assert run("--input", write_manifest(corpus.folder, "csv", corpus.rows), "--out", out, "--model", tiny_en_dir) == 0
    speech = split_bytes(out)
    noise = tmp_path / "noise"
    (noise / "street").mkdir(parents=True)
    long = clip(7, 70.5, 8000)
    sf.write(noise / "street" / "traffic.wav", long, 8000, subtype="PCM_16")  # 30 + 30 + 10.5 s
    sf.write(noise / "hum.flac", clip(8, 0.5), 16000, subtype="PCM_16")  # short: one piece
    (noise / "broken.wav").write_bytes(b"not audio at all")
    assert run("--noise_dir", noise, "--out", out) == 0
    bank = pp.PreparedSplit(out, "noise")
    assert [bank.row(i)["id"] for i in range(len(bank))] == ["hum.flac#0"] + [f"street/traffic.wav#{k}" for k in range(3)]
    assert [len(bank.audio(i)) for i in range(len(bank))] == [8000, 480000, 480000, 168000]
    assert all(len(bank.tokens(i)) == 0 for i in range(len(bank)))
    whole = dw.resample(long / 32768, 8000, 16000)  # pieces are resampled one by one: equal away from their edges
    assert np.abs(bank.audio(2)[1000:-1000] / 32768 - whole[481000:959000]).max() < 3e-4
    meta = json.loads((out / "meta.json").read_text())
    assert meta["jobs"]["noise"]["dropped"] == {"undecodable_audio": 1} and meta["splits"]["noise"]["clips"] == 4
    assert meta["jobs"]["speech"]["kept"] == 6 and split_bytes(out) == speech  # the speech splits are left as they were


def test_batch_reads_padded_float_audio(tmp_path):
    w = pp.SplitWriter(tmp_path, "train")
    audio = [np.linspace(-1, 1, n, dtype=np.float32) for n in (5, 12, 8)]
    for i, a in enumerate(audio):
        w.add(a, [50257, 7 + i, 50256], {"id": str(i), "text": "x"})
    assert w.close() == (3, 25 / 16000 / 3600)
    s = pp.PreparedSplit(tmp_path, "train")
    x, tokens = s.batch([2, 0], n_samples=10)
    assert x.shape == (2, 10) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :8], audio[2], atol=1 / 32768)
    np.testing.assert_allclose(x[1, :5], audio[0], atol=1 / 32768)
    assert not x[0, 8:].any() and not x[1, 5:].any()
    assert np.array_equal(s.batch([1], n_samples=10)[0][0], s.audio(1)[:10] / 32768)  # trimmed
    raw, _ = s.batch([2, 0], n_samples=10, dtype=np.int16)
    assert raw.dtype == np.int16 and np.array_equal(raw / 32768, x)
    assert [t.tolist() for t in tokens] == [[50257, 9, 50256], [50257, 7, 50256]]
    (tmp_path / "train.audio.bin").write_bytes((tmp_path / "train.audio.bin").read_bytes()[:-4])  # cut short
    with pytest.raises(ValueError, match="does not match its index"):
        pp.PreparedSplit(tmp_path, "train")


def test_memory_stays_bounded(tmp_path, tiny_en_dir):
    """Peak Python memory while preparing 400 one-second clips is about that of 100: nothing grows
    with the number of clips (300 more clips would hold 9.6 MB of audio)."""
    folder = tmp_path / "in"
    folder.mkdir()
    one = clip(0, 1.0)
    for i in range(400):
        sf.write(folder / f"{i:03d}.wav", np.roll(one, i), 16000, subtype="PCM_16")
    rows = [{"path": f"{i:03d}.wav", "text": f"clip number {i}"} for i in range(400)]
    peaks = []
    for n in (100, 400):
        manifest = write_manifest(folder, "csv", rows[:n]).rename(folder / f"m{n}.csv")
        pp.resolve_tokenizer(str(tiny_en_dir))  # cached: its one-off allocation is not part of the measure
        tracemalloc.start()
        assert run("--input", manifest, "--out", tmp_path / f"out{n}", "--model", tiny_en_dir, checkpoint_every=5) == 0
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert len(pp.PreparedSplit(tmp_path / "out400", "train")) + len(pp.PreparedSplit(tmp_path / "out400", "val")) == 400
    assert peaks[1] < peaks[0] + 2e6, peaks


# -----------------------------------------------------------------------------
# the demo


def test_demo_is_spoken_english_and_azerbaijani(tmp_path, tiny_en, tiny_en_dir, multilingual_tokenizer_dir):
    import shutil

    import jiwer
    import torch

    if shutil.which("espeak-ng") is None:
        (pytest.fail if IN_CI else pytest.skip)("espeak-ng is not installed")
    out = tmp_path / "demo"
    assert run("--demo", "--demo_sentences", 4, "--out", out, "--model", tiny_en_dir, workers=2, checkpoint_every=5) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["jobs"]["speech"]["kept"] == 4 and meta["jobs"]["speech"]["language"] == "en"
    assert meta["splits"]["noise"]["clips"] == 12  # white, pink, brown, hum, 2 babbles: 40 s each, in 30 s pieces
    clips = {**contents(out, "train"), **contents(out, "val")}
    assert {v[1] for v in clips.values()} == {"en"}
    # the English clips are speech that Whisper itself understands
    tok = dw.get_tokenizer(tiny_en)
    texts = [v[0] for v in clips.values()][:2]
    audio = torch.from_numpy(np.stack([dw.pad_or_trim(v[2] / np.float32(32768)) for v in list(clips.values())[:2]]))
    mel = dw.log_mel_spectrogram(audio, 80)[..., : dw.N_FRAMES]
    heard = [tok.decode(t) for t in dw.greedy_decode(tiny_en, mel, tok, max_tokens=40)]
    assert jiwer.wer([t.lower() for t in texts], [h.strip().lower() for h in heard]) < 0.4, heard

    az = tmp_path / "demo-az"
    assert run("--demo", "--demo_sentences", 2, "--out", az, "--model", multilingual_tokenizer_dir, "--val_fraction", 0,
               workers=2, checkpoint_every=5) == 0
    got = contents(az, "train")
    assert {v[1] for v in got.values()} == {"en", "az"}
    for text, lang, samples, tokens in got.values():
        assert tokens == whisper_tokens(text, True, lang) and np.abs(samples).max() > 3000


def test_original_projects_spellings(corpus, parquet_dataset, tmp_path, tiny_en_dir, multilingual_tokenizer_dir, capsys):
    """A user of the original project's prepare_data.py changes only the script's name: its flags
    --hf_dataset, --hf_split, --hf_audio_column, --hf_text_column, --language, --output_dir, and
    --audio_dir with --transcripts, give what ours give."""
    hf = ["--hf_split", "train", "--hf_audio_column", "audio", "--hf_text_column", "text", "--val_fraction", 0]
    ours = tmp_path / "ours"
    assert run("--hf_dataset", parquet_dataset.folder, *hf, "--out", ours, "--model", multilingual_tokenizer_dir, "--language", "az") == 0
    theirs = tmp_path / "theirs"
    assert run("--hf_dataset", parquet_dataset.folder, *hf, "--output_dir", theirs, "--model", multilingual_tokenizer_dir,
               "--language", "az") == 0
    assert split_bytes(theirs) == split_bytes(ours) and len(contents(theirs, "train")) == 7
    # a manifest kept apart from the audio: its paths are relative to --audio_dir
    apart = tmp_path / "lists"
    apart.mkdir()
    transcripts = write_manifest(apart, "csv", corpus.rows)
    assert run("--input", write_manifest(corpus.folder, "jsonl", corpus.rows), "--out", tmp_path / "a", "--model", tiny_en_dir) == 0
    assert run("--audio_dir", corpus.folder, "--transcripts", transcripts, "--output_dir", tmp_path / "b", "--model", tiny_en_dir) == 0
    assert split_bytes(tmp_path / "b") == split_bytes(tmp_path / "a")
    capsys.readouterr()
    assert run("--audio_dir", corpus.folder, "--transcripts", apart / "missing.csv", "--output_dir", tmp_path / "c") == 2
    assert "--transcripts" in capsys.readouterr().err and not (tmp_path / "c").exists()
    # a non-English --language with the default English-only tokenizer: the error names the fix
    assert run("--hf_dataset", parquet_dataset.folder, *hf, "--output_dir", tmp_path / "d", "--language", "az") == 2
    err = capsys.readouterr().err
    assert "English-only" in err and "multilingual --model" in err and len(err.strip().splitlines()) == 1


def test_containers_soundfile_cannot_read(tmp_path, jfk_audio, tiny_en_dir, monkeypatch):
    """m4a files in a folder, and m4a bytes as a dataset row carries them, are prepared through PyAV
    as dualwhisper.load_audio reads them; without PyAV they are dropped as undecodable."""
    from test_audio import _encode

    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(2):
        _encode(folder / f"c{i}.m4a", "ipod", "aac", jfk_audio[16000 * i: 16000 * (i + 2)], 16000)
        (folder / f"c{i}.txt").write_text("ask not")
    assert run("--input", folder, "--out", tmp_path / "out", "--model", tiny_en_dir, "--val_fraction", 0) == 0
    got = contents(tmp_path / "out", "train")
    for i in range(2):
        ref = pp.to_int16(dw.load_audio(folder / f"c{i}.m4a"))
        assert np.array_equal(got[f"c{i}"][2], ref)
        assert np.array_equal(pp.decode_audio((folder / f"c{i}.m4a").read_bytes()), ref)  # bytes, as parquet rows hold them
    monkeypatch.setitem(sys.modules, "av", None)
    assert pp.decode_audio(str(folder / "c0.m4a")) == "undecodable_audio"
