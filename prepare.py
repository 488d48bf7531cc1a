"""
prepare.py: turn speech datasets into dualwhisper's training format.

  python prepare.py --demo                                   # a small spoken corpus made with espeak-ng
  python prepare.py --input clips/ --out data/mine           # a folder with a manifest or .txt transcripts
  python prepare.py --hf_dataset LocalDoc/azerbaijani_asr --language az \\
                    --model ../shared/tokenizers/whisper-multilingual --out data/az
  python prepare.py --noise_dir noises/ --out data/az        # add a noise bank to a prepared folder
  python prepare.py --corpus data/corpus --hours 2 --languages en   # an experiment corpus made with espeak-ng

The format (one output folder, in the spirit of nanoGPT's train.bin), per split (train, val, and
optionally test (from a manifest's split column), noise and noise_test (held-out noise recordings)):
  {split}.audio.bin    every clip's 16 kHz audio as int16 samples, one after another
  {split}.tokens.bin   every clip's decoder tokens as uint16: <|startoftranscript|> [language task]
                       <|notimestamps|> text tokens <|endoftext|>  (empty for noise)
  {split}.index.npy    one row per clip: audio_offset, audio_len, token_offset, token_len
  {split}.jsonl        one JSON object per clip: id, text, language
  meta.json            counts, hours, tokenizer, source, filter report

How it runs: rows stream from the source (a manifest, a folder, parquet shards one at a time) in a
fixed order; their text is tokenized here and their audio decoded in worker processes, a bounded
number of clips in flight. Clips are appended to files in a work folder ({out}/.prepare-{job});
every few seconds the files are synced and the position in the source saved, so an interrupted run,
started again with the same command, truncates back to the last save and goes on from there. The
finished files are renamed into the output folder, each split's index last, and meta.json after them:
a reader sees the old complete data or the new complete data, never a half-written split.
"""

import argparse
import csv
import functools
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import dualwhisper as dw

FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype([("audio_offset", "<i8"), ("audio_len", "<i8"), ("token_offset", "<i8"), ("token_len", "<i4")])
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".m4a", ".mp4", ".aac", ".webm", ".wma")
MANIFEST_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")
NOISE_SEGMENT_SECONDS = 30  # long noise recordings are cut into pieces of at most this length
SHARED = Path(os.environ.get("DUALWHISPER_SHARED", Path(__file__).resolve().parent.parent / "shared"))
DEFAULT_MODEL = str(SHARED / "models" / "whisper-tiny.en") if (SHARED / "models" / "whisper-tiny.en").is_dir() else "tiny.en"

# Why a row is left out, in the order the checks run; the final report and meta.json count each.
FILTERS = {
    "bad_row": "a manifest row that is not valid JSON or lacks its path or text",
    "missing_text": "no .txt transcript beside the audio file",
    "bad_text": "transcript that is not valid UTF-8",
    "empty_text": "empty transcript",
    "unsupported_language": "a language the tokenizer has no token for",
    "too_long_text": "transcript longer than the decoder's context (n_text_ctx, prompt included)",
    "missing_audio": "audio file not found",
    "undecodable_audio": "audio that cannot be decoded (m4a, mp4, webm, ... need PyAV: pip install av), is empty or holds NaN",
    "too_long_audio": "audio longer than --max_seconds",
}


class PrepareError(Exception):
    """A problem with the user's input or settings: reported in one line, exit status 2."""


# -----------------------------------------------------------------------------
# the format: reading


class PreparedSplit:
    """Read one split of a prepared folder with memmap: nothing is loaded until asked for."""

    def __init__(self, folder, split="train"):
        self.folder, self.split = Path(folder), split
        index = self.folder / f"{split}.index.npy"
        if not index.exists():
            raise FileNotFoundError(f"no prepared split {split!r} in {self.folder} (expected {index.name}); run prepare.py first")
        self.index = np.load(index, mmap_mode="r")
        self._audio = self._memmap(f"{split}.audio.bin", np.int16)
        self._tokens = self._memmap(f"{split}.tokens.bin", np.uint16)
        self._rows = None
        if len(self.index):  # rows are written back to back: the last one ends where the files end
            last = self.index[-1]
            if last["audio_offset"] + last["audio_len"] != len(self._audio) or last["token_offset"] + last["token_len"] != len(self._tokens):
                raise ValueError(f"split {split!r} in {self.folder} does not match its index (a copy cut short?); run prepare.py again")

    def _memmap(self, name, dtype):
        path = self.folder / name
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def __len__(self):
        return len(self.index)

    def audio(self, i):
        """int16 samples of clip i (a memmap view; divide by 32768 for floats)."""
        row = self.index[i]
        return self._audio[row["audio_offset"]: row["audio_offset"] + row["audio_len"]]

    def tokens(self, i):
        """The full decoder token sequence of clip i, prompt and <|endoftext|> included."""
        row = self.index[i]
        return np.asarray(self._tokens[row["token_offset"]: row["token_offset"] + row["token_len"]], dtype=np.int64)

    def batch(self, indices, n_samples=dw.N_SAMPLES, dtype=np.float32):
        """What a training step reads: the audio of clips `indices` as (B, n_samples), each clip
        zero-padded or trimmed to n_samples, and their token sequences (a list of int64 arrays).
        dtype float32: samples in [-1, 1]; int16: the stored samples, half the bytes to copy and to
        send to the GPU (divide by 32768 there)."""
        rows = self.index[np.asarray(indices)]
        audio = np.zeros((len(rows), n_samples), dtype=dtype)
        for b, (offset, n) in enumerate(zip(rows["audio_offset"], rows["audio_len"])):
            n = min(int(n), n_samples)
            if audio.dtype == np.int16:
                audio[b, :n] = self._audio[offset: offset + n]
            else:
                np.multiply(self._audio[offset: offset + n], audio.dtype.type(1 / 32768), out=audio[b, :n])
        tokens = [np.asarray(self._tokens[o: o + n], dtype=np.int64) for o, n in zip(rows["token_offset"], rows["token_len"])]
        return audio, tokens

    def row(self, i):
        """id, text, language and (where the source names one) speaker of clip i."""
        if self._rows is None:
            with open(self.folder / f"{self.split}.jsonl", encoding="utf-8") as f:
                self._rows = [json.loads(line) for line in f]
        return self._rows[i]

    @property
    def lengths(self):
        return np.asarray(self.index["audio_len"])

    @property
    def meta(self):
        return json.loads((self.folder / "meta.json").read_text())


# -----------------------------------------------------------------------------
# the format: writing


def to_int16(audio):
    """float samples in [-1, 1] -> int16, on the scale soundfile reads 16-bit files with (x 32768)."""
    return np.clip(np.round(np.asarray(audio, dtype=np.float32) * 32768.0), -32768, 32767).astype("<i2")


class SplitWriter:
    """Append clips to one split, in files inside a work folder.

    `sync()` makes what is written durable and `state()` then says how far the files go;
    `SplitWriter(folder, split, work, state)` truncates them back to such a state, which is how an
    interrupted run resumes. `close()` (= `finish()` then `publish()`) writes the index and renames
    the files into `folder`, the index last: a reader never sees a half-written split."""

    KINDS = ("audio.bin", "tokens.bin", "jsonl", "index.bin")

    def __init__(self, folder, split, work=None, state=None):
        self.folder, self.split = Path(folder), split
        self.work = Path(work) if work is not None else self.folder / f".{split}.partial"
        self.work.mkdir(parents=True, exist_ok=True)
        state = state or {"clips": 0, "samples": 0, "tokens": 0, "bytes": {kind: 0 for kind in self.KINDS}, "languages": {}}
        self.clips, self.samples, self.n_tokens = state["clips"], state["samples"], state["tokens"]
        self.languages = Counter(state["languages"])
        self.files = {}
        for kind in self.KINDS:
            path, size = self.work / f"{split}.{kind}", state["bytes"][kind]
            if path.exists() and path.stat().st_size >= size:
                f = open(path, "r+b")
            elif size == 0:
                f = open(path, "w+b")
            else:
                raise PrepareError(f"{path} is shorter than the saved progress says; start again with --restart")
            f.truncate(size)  # drop whatever was written after the last sync
            f.seek(size)
            self.files[kind] = f

    def add(self, audio, tokens, row):
        """audio: int16 samples, or float samples in [-1, 1], at 16 kHz; tokens: the full decoder
        sequence; row: a dict with at least id and text."""
        pcm = np.asarray(audio).astype("<i2", copy=False) if np.asarray(audio).dtype == np.int16 else to_int16(audio)
        toks = np.asarray(tokens, dtype="<u2")
        entry = np.array([(self.samples, len(pcm), self.n_tokens, len(toks))], dtype=INDEX_DTYPE)
        self.files["audio.bin"].write(pcm.tobytes())
        self.files["tokens.bin"].write(toks.tobytes())
        self.files["jsonl"].write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self.files["index.bin"].write(entry.tobytes())
        self.clips, self.samples, self.n_tokens = self.clips + 1, self.samples + len(pcm), self.n_tokens + len(toks)
        self.languages[row.get("language")] += 1

    def sync(self):
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())

    def state(self):
        return {"clips": self.clips, "samples": self.samples, "tokens": self.n_tokens,
                "bytes": {kind: f.tell() for kind, f in self.files.items()},
                "languages": {k: v for k, v in self.languages.items() if k is not None}}

    def summary(self):
        return {"clips": self.clips, "hours": round(self.samples / dw.SAMPLE_RATE / 3600, 6), "samples": self.samples,
                "tokens": self.n_tokens, "languages": self.state()["languages"]}

    def finish(self):
        """Sync, close, and turn the raw index into {split}.index.npy (still in the work folder)."""
        self.sync()
        for f in self.files.values():
            f.close()
        raw = self.work / f"{self.split}.index.bin"
        n = raw.stat().st_size // INDEX_DTYPE.itemsize
        out = np.lib.format.open_memmap(self.work / f"{self.split}.index.npy", mode="w+", dtype=INDEX_DTYPE, shape=(n,))
        if n:
            out[:] = np.memmap(raw, dtype=INDEX_DTYPE, mode="r", shape=(n,))
        out.flush()
        del out  # the raw index stays until the work folder goes: a resume before publishing still finds it

    def publish(self):
        publish_split(self.work, self.folder, self.split)

    def close(self):
        self.finish()
        self.publish()
        (self.work / f"{self.split}.index.bin").unlink()
        if not any(self.work.iterdir()):
            self.work.rmdir()
        return self.clips, self.samples / dw.SAMPLE_RATE / 3600


def publish_split(work, folder, split):
    """Rename a finished split from the work folder into place, its index last. Safe to repeat
    after an interruption: what was moved already is not there any more."""
    for kind in ("audio.bin", "tokens.bin", "jsonl", "index.npy"):
        src = Path(work) / f"{split}.{kind}"
        if src.exists():
            with open(src, "rb") as f:
                os.fsync(f.fileno())
            os.replace(src, Path(folder) / f"{split}.{kind}")


def write_json_atomic(path, obj):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


# -----------------------------------------------------------------------------
# audio, text, split


def decode_audio(audio, start=0, frames=-1, max_seconds=None):
    """16 kHz mono int16 samples of an audio file or of encoded bytes, or the name of the filter that
    drops them. soundfile reads wav, flac, ogg and mp3: 16 kHz input as int16 as it is (lossless),
    other rates as floats resampled with dualwhisper.resample; other formats (m4a, mp4, webm, ...)
    go through PyAV where it is installed, as dualwhisper.load_audio reads them."""
    import soundfile as sf

    if audio is None or (isinstance(audio, (str, os.PathLike)) and not os.path.isfile(audio)):
        return "missing_audio"
    try:
        with sf.SoundFile(io.BytesIO(audio) if isinstance(audio, (bytes, bytearray)) else audio) as f:
            sr, channels = f.samplerate, f.channels
            if max_seconds is not None and f.frames > max_seconds * sr:
                return "too_long_audio"  # known from the header: no need to decode
            if start:
                f.seek(start)
            data = f.read(frames, dtype="int16" if sr == dw.SAMPLE_RATE else "float32", always_2d=True)
    except Exception:  # libsndfile reports bad data with several exception types
        try:
            x, sr = dw.decode_with_av(io.BytesIO(audio) if isinstance(audio, (bytes, bytearray)) else audio)
        except Exception:  # PyAV missing, or the data not audio it knows
            return "undecodable_audio"
        data = x[start: None if frames < 0 else start + frames, None]  # (n, 1), mixed down already
    if data.shape[0] == 0:
        return "undecodable_audio"
    if data.dtype == np.int16:
        pcm = data[:, 0] if channels == 1 else (data.astype(np.int32).sum(axis=1) // channels).astype(np.int16)
    else:
        x = dw.mix_down(data)
        if not np.isfinite(x).all():
            return "undecodable_audio"
        pcm = to_int16(dw.resample(x, sr, dw.SAMPLE_RATE))
    if max_seconds is not None and len(pcm) > max_seconds * dw.SAMPLE_RATE:
        return "too_long_audio"
    return np.ascontiguousarray(pcm, dtype="<i2")


def _decode_chunk(jobs):
    return [decode_audio(*job) for job in jobs]


def _init_worker():
    import signal

    import torch

    torch.set_num_threads(1)  # one process per core already
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process, which ends the pool


def split_of(utterance_id, val_fraction):
    """'val' or 'train' from a hash of the utterance id alone: the same id lands in the same split
    whatever else the dataset holds or in what order it comes."""
    digest = hashlib.blake2b(str(utterance_id).encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


def is_utf8(s):
    try:
        s.encode("utf-8")  # text read with errors="surrogateescape" holds lone surrogates where bytes were bad
        return True
    except UnicodeEncodeError:
        return False


@functools.lru_cache(maxsize=8)
def _tokenizer(folder, n_vocab, mtime):
    return dw.Tokenizer.from_pretrained(folder, n_vocab=n_vocab)


def resolve_tokenizer(name):
    """(tokenizer, its entry for meta.json, n_text_ctx) for --model: a checkpoint or tokenizer folder, an official
    name or a hub id, found the way dualwhisper.load_model finds them but fetching the tokenizer files
    only."""
    try:
        path = dw.resolve(name, dw.TOKENIZER_FILES + ["config.json"], what="tokenizer folder", needs="vocab.json")
    except FileNotFoundError as e:
        raise PrepareError(f"{e} (pass a model or tokenizer folder, an official name such as tiny.en, or a hub id)") from None
    except ConnectionError as e:
        raise PrepareError(str(e)) from None
    if not (path / "vocab.json").exists():
        raise PrepareError(f"{path} holds no vocab.json: not a Whisper model or tokenizer folder")
    cfg = read_json(path / "config.json") or {}
    dims = cfg.get("dims", {}) if cfg.get("model_type") == "dualwhisper" else {}
    n_vocab = dims.get("n_vocab", cfg.get("vocab_size", 51865))
    n_text_ctx = dims.get("n_text_ctx", cfg.get("max_target_positions", 448))
    tok = _tokenizer(path.resolve(), n_vocab, (path / "vocab.json").stat().st_mtime)
    vocab_sha1 = hashlib.sha1((path / "vocab.json").read_bytes()).hexdigest()
    info = {"name": str(name), "n_vocab": n_vocab, "multilingual": tok.multilingual, "vocab_sha1": vocab_sha1}
    return tok, info, n_text_ctx


class Transcripts:
    """A row's text and language -> its full decoder token sequence, or the filter that drops it."""

    def __init__(self, tok, language=None, task="transcribe", n_text_ctx=448):
        self.tok, self.task, self.n_text_ctx = tok, task, n_text_ctx
        if task not in ("transcribe", "translate"):
            raise PrepareError(f"--task must be transcribe or translate, not {task!r}")
        if not tok.multilingual and task == "translate":
            raise PrepareError("an English-only tokenizer has no translate task; use a multilingual model's tokenizer")
        self.language = self.code(language) if language else ("en" if not tok.multilingual else None)
        if language and self.language is None:
            raise PrepareError(f"the tokenizer has no token for language {language!r}"
                               + ("" if tok.multilingual else " (it is English-only; pass a multilingual --model, e.g. ../shared/tokenizers/whisper-multilingual)"))
        self.prompts = {}

    def code(self, language):
        """The language code the tokenizer knows, or None."""
        try:
            code = self.tok.to_language_code(str(language).strip())
        except ValueError:
            return None
        return code if self.tok.multilingual or code == "en" else None

    def __call__(self, text, language=None):
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                return "bad_text"
        if text is not None and not isinstance(text, str):
            text = str(text)
        if text is not None and not is_utf8(text):
            return "bad_text"
        text = " ".join((text or "").split())
        if not text:
            return "empty_text"
        code = self.code(language) if language else self.language
        if code is None:
            return "unsupported_language"
        if code not in self.prompts:
            self.prompts[code] = self.tok.sot_sequence(code, self.task) + [self.tok.no_timestamps]
        tokens = self.prompts[code] + self.tok.encode(" " + text) + [self.tok.eot]  # Whisper's transcripts start with a space
        if len(tokens) > self.n_text_ctx:
            return "too_long_text"
        return {"tokens": tokens, "text": text, "language": code}


# -----------------------------------------------------------------------------
# sources: each yields (cursor, item) in a fixed order; `items(cursor)` starts after that cursor.
# An item is a dict with id, audio (a path or encoded bytes), text, language, and maybe error
# (the filter that drops it); (cursor, None) only moves the cursor on.

PATH_COLUMNS = ("path", "audio", "file", "audio_path", "audio_filepath", "filename")
TEXT_COLUMNS = ("text", "sentence", "transcript", "transcription")
LANGUAGE_COLUMNS = ("language", "lang", "locale")
SPEAKER_COLUMNS = ("speaker", "speaker_id", "client_id", "voice")  # train.py --pack_by speaker packs a speaker's clips together
SPLITS = ("train", "val", "test")  # a manifest's split column may name these; without one, train and val by hash


def _json_lines(lines):
    """One JSON value per non-blank line, None for a line that is not valid JSON."""
    for line in lines:
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None


def _sha1_of_file(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def audio_files(folder):
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in files if f.lower().endswith(AUDIO_SUFFIXES)]
    return sorted(Path(p).relative_to(folder).as_posix() for p in out)


class LocalSource:
    """A folder of audio files with a manifest (a JSON list, JSON lines, CSV or TSV with columns path,
    text and optionally language and id; paths relative to the manifest), or a .txt transcript beside
    each audio file. `path` is the folder or the manifest itself; `audio_dir`, when given, is the
    folder that the manifest's paths are relative to instead."""

    def __init__(self, path, audio_dir=None):
        path = Path(path).expanduser()
        if audio_dir is not None and not Path(audio_dir).expanduser().is_dir():
            raise PrepareError(f"audio folder not found: {audio_dir}")
        if path.is_dir():
            manifests = sorted(p for p in path.iterdir() if p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file())
            if len(manifests) > 1:
                raise PrepareError(f"{path} holds several manifests ({', '.join(p.name for p in manifests)}); pass the one to use as --input")
            self.manifest = manifests[0] if manifests else None
            self.root = path
        elif path.is_file():
            if path.suffix.lower() not in MANIFEST_SUFFIXES:
                raise PrepareError(f"{path} is not a manifest: expected a folder or a .json, .jsonl, .csv or .tsv file")
            self.manifest, self.root = path, path.parent
        else:
            raise PrepareError(f"input not found: {path}")
        if audio_dir is not None:
            self.root = Path(audio_dir).expanduser()
        self.has_language = False
        if self.manifest is not None:
            self.description = str(self.manifest)
            self.signature = {"manifest": str(self.manifest.resolve()), "sha1": _sha1_of_file(self.manifest)}
            if audio_dir is not None:
                self.signature["audio_dir"] = str(self.root.resolve())
            self.columns = self._columns()
            self.has_language = self.columns["language"] is not None
        else:
            self.files = audio_files(self.root)
            if not self.files:
                raise PrepareError(f"{self.root} holds no audio files ({', '.join(AUDIO_SUFFIXES)}) and no manifest")
            self.description = f"{self.root} (.txt beside each audio file)"
            self.signature = {"folder": str(self.root.resolve()), "files": hashlib.sha1("\n".join(self.files).encode("utf-8", "surrogateescape")).hexdigest()}
        self.note = ""

    def _rows(self):
        """The manifest's rows as dicts, None for a row that cannot be read."""
        suffix = self.manifest.suffix.lower()
        with open(self.manifest, encoding="utf-8", errors="surrogateescape", newline="") as f:
            if suffix == ".jsonl":
                rows = _json_lines(f)
            elif suffix == ".json":
                text = f.read()
                try:
                    rows = json.loads(text)
                except json.JSONDecodeError as e:
                    if e.msg != "Extra data":
                        raise PrepareError(f"{self.manifest} is not valid JSON ({e})") from None
                    rows = _json_lines(text.splitlines())  # objects one after another: JSON lines, as NeMo's .json manifests hold
                else:
                    rows = [rows] if isinstance(rows, dict) else rows  # one object: JSON lines of one line
                    if not isinstance(rows, list):
                        raise PrepareError(f"{self.manifest} holds a JSON {type(rows).__name__}; expected a list of objects with path and text")
            else:
                rows = (None if None in row or None in row.values() else row  # too many or too few fields
                        for row in csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
            for row in rows:
                yield row if isinstance(row, dict) else None

    def _columns(self):
        if self.manifest.suffix.lower() in (".csv", ".tsv"):
            with open(self.manifest, encoding="utf-8", errors="surrogateescape", newline="") as f:
                names = next(csv.reader(f, delimiter="\t" if self.manifest.suffix.lower() == ".tsv" else ","), [])
        else:
            first = next((row for row in self._rows() if row is not None), None)
            if first is None:
                raise PrepareError(f"{self.manifest} holds no rows")
            names = list(first)

        def pick(candidates, what):
            found = [c for c in candidates if c in names]
            if not found and what:
                raise PrepareError(f"{self.manifest} has no {what} column (columns: {', '.join(map(str, names)) or 'none'};"
                                   f" expected one of {', '.join(candidates)})")
            return found[0] if found else None

        return {"path": pick(PATH_COLUMNS, "audio path"), "text": pick(TEXT_COLUMNS, "transcript"),
                "language": pick(LANGUAGE_COLUMNS, None), "split": pick(("split",), None)}

    def items(self, cursor=None, work=None):
        start = cursor or 0
        rows = self._manifest_items() if self.manifest is not None else self._txt_items(start)
        for i, item in enumerate(rows, start=0 if self.manifest is not None else start):
            if i >= start:
                yield i + 1, item

    def _manifest_items(self):
        c = self.columns
        for n, row in enumerate(self._rows()):
            if row is None or row.get(c["path"]) in (None, "") or c["text"] not in row:
                yield {"id": f"row{n}", "error": "bad_row"}
                continue
            rel = str(row[c["path"]])
            path = rel if os.path.isabs(rel) else os.path.join(self.root, rel)
            uid = row.get("id") if row.get("id") not in (None, "") else Path(rel).with_suffix("").as_posix()
            # the first of the usual column names with a value (JSON rows may differ in keys)
            language, speaker = (next((row[k] for k in names if row.get(k) not in (None, "")), None)
                                 for names in (LANGUAGE_COLUMNS, SPEAKER_COLUMNS))
            item = {"id": str(uid), "audio": path, "text": row[c["text"]], "language": language, "speaker": speaker}
            if c["split"] is not None:
                if row.get(c["split"]) not in SPLITS:
                    raise PrepareError(f"{self.manifest}: row {n + 1} has split {row.get(c['split'])!r}; expected one of {', '.join(SPLITS)}")
                item["split"] = row[c["split"]]
            yield item

    def _txt_items(self, start):
        for rel in self.files[start:]:
            path = self.root / rel
            item = {"id": Path(rel).with_suffix("").as_posix(), "audio": str(path)}
            try:
                item["text"] = path.with_suffix(".txt").read_bytes()  # decoded (or rejected) with the other texts
            except FileNotFoundError:
                item["error"] = "missing_text"
            yield item


class ParquetSource:
    """Parquet shards of a Hugging Face dataset (an `audio` column of {bytes, path} structs or raw
    bytes, a text column), from a local folder or from the hub, one shard at a time: a hub shard is
    downloaded into the work folder (the next one while this one is processed) and deleted once read.
    Utterance ids come from `id_column`, or are "{shard name}/{row}"."""

    def __init__(self, name, split="train", audio_column="audio", text_column="text", id_column=None,
                 language_column=None, revision=None, speaker_column=None):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise PrepareError("reading parquet shards needs pyarrow: pip install pyarrow") from None
        self.name, self.split, self.revision = name, split, revision
        self.columns = {"audio": audio_column, "text": text_column, "id": id_column, "language": language_column,
                        "speaker": speaker_column}
        self.has_language = language_column is not None
        local = Path(name).expanduser()
        if local.is_dir():
            self.local = local
            files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.parquet"))
            sizes = {f: (local / f).stat().st_size for f in files}
        elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
            self.local = None
            from huggingface_hub import HfApi

            try:
                info = HfApi().dataset_info(name, revision=revision)
            except Exception as e:
                raise PrepareError(f"cannot list the files of dataset {name} on the Hugging Face Hub ({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__})") from None
            self.revision = info.sha
            files = sorted(s.rfilename for s in info.siblings if s.rfilename.endswith(".parquet"))
            sizes = {}
        else:
            raise PrepareError(f"--hf_dataset {name}: no such folder, and not a hub id like LocalDoc/azerbaijani_asr")
        self.files = [f for f in files if split in re.split(r"[/._-]", f)]
        if not self.files:
            raise PrepareError(f"no parquet shards of split {split!r} in {name} (found: {', '.join(files[:5]) or 'none'}); pass --hf_split"
                               + ("" if files or local.is_dir() else ", or --hf_revision refs/convert/parquet for a dataset stored in another format"))
        self.description = f"{name} split {split}" + (f" at {self.revision}" if self.revision else "")
        self.signature = {"dataset": str(local.resolve()) if self.local else name, "revision": self.revision,
                          "files": [[f, sizes.get(f)] for f in self.files], "columns": self.columns}
        self.note = ""
        if self.local:
            self._open(self.local / self.files[0], self.files[0])  # wrong column names fail now, before any work

    def _open(self, path, shard):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise PrepareError(f"shard {shard} is not a readable parquet file ({str(e).strip()[:120]}); download it again") from None
        schema = pf.schema_arrow
        for role in ("audio", "text"):
            if self.columns[role] not in schema.names:
                raise PrepareError(f"shard {shard} has no column {self.columns[role]!r} (columns: {', '.join(schema.names)});"
                                   f" pass --hf_{role}_column")
        for role in ("id", "language", "speaker"):
            if self.columns[role] is not None and self.columns[role] not in schema.names:
                raise PrepareError(f"shard {shard} has no column {self.columns[role]!r} (columns: {', '.join(schema.names)})")
        kind = schema.field(self.columns["audio"]).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
            raise PrepareError(f"column {self.columns['audio']!r} of shard {shard} holds {kind}, not audio bytes ({{bytes, path}} structs or binary)")
        return pf

    def _fetch(self, i, work):
        if self.local:
            return self.local / self.files[i]
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.name, self.files[i], repo_type="dataset", revision=self.revision, local_dir=Path(work) / "shards"))
        except Exception as e:
            raise PrepareError(f"cannot download {self.files[i]} of {self.name} ({str(e).strip()[:120] or type(e).__name__}); "
                               "run the same command again to resume") from None

    def items(self, cursor=None, work=None):
        import pyarrow as pa

        shard0, skip = cursor or (0, 0)
        with ThreadPoolExecutor(1) as fetcher:
            nxt = fetcher.submit(self._fetch, shard0, work) if shard0 < len(self.files) else None
            for i in range(shard0, len(self.files)):
                path = nxt.result()
                nxt = fetcher.submit(self._fetch, i + 1, work) if i + 1 < len(self.files) else None
                self.note = f" | shard {i + 1}/{len(self.files)}"
                pf = self._open(path, self.files[i])
                row, groups = 0, []
                for g in range(pf.num_row_groups):  # skip whole row groups that were done before
                    n = pf.metadata.row_group(g).num_rows
                    if row + n <= (skip if i == shard0 else 0):
                        row += n
                    else:
                        groups.append(g)
                cols = [c for c in self.columns.values() if c is not None]
                for batch in (pf.iter_batches(batch_size=32, row_groups=groups, columns=cols) if groups else []):
                    audio = batch.column(self.columns["audio"])
                    if pa.types.is_struct(audio.type):
                        audio = audio.field("bytes")
                    audio, texts = audio.to_pylist(), batch.column(self.columns["text"]).to_pylist()
                    ids = batch.column(self.columns["id"]).to_pylist() if self.columns["id"] else None
                    langs = batch.column(self.columns["language"]).to_pylist() if self.columns["language"] else None
                    speakers = batch.column(self.columns["speaker"]).to_pylist() if self.columns["speaker"] else None
                    for j in range(batch.num_rows):
                        if i == shard0 and row < skip:
                            row += 1
                            continue
                        uid = ids[j] if ids and ids[j] not in (None, "") else f"{Path(self.files[i]).stem}/{row}"
                        item = {"id": str(uid), "audio": audio[j], "text": texts[j], "language": langs[j] if langs else None,
                                "speaker": speakers[j] if speakers else None}
                        row += 1
                        yield (i, row), item
                del pf
                if not self.local:
                    Path(path).unlink(missing_ok=True)  # this shard is read; its clips are written soon after
                yield (i + 1, 0), None


class NoiseSource:
    """Every audio file under a folder, cut into pieces of at most NOISE_SEGMENT_SECONDS (a last
    piece under a second is dropped), for the noise bank."""

    def __init__(self, folder):
        self.root = Path(folder).expanduser()
        if not self.root.is_dir():
            raise PrepareError(f"noise folder not found: {self.root}")
        self.files = audio_files(self.root)
        if not self.files:
            raise PrepareError(f"{self.root} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
        self.description = str(self.root)
        self.signature = {"folder": str(self.root.resolve()), "files": hashlib.sha1("\n".join(self.files).encode("utf-8", "surrogateescape")).hexdigest()}
        self.note = ""

    def items(self, cursor=None, work=None):
        import soundfile as sf

        file0, seg0 = cursor or (0, 0)
        for i in range(file0, len(self.files)):
            path = str(self.root / self.files[i])
            try:
                info = sf.info(path)
                seg = NOISE_SEGMENT_SECONDS * info.samplerate
                n = max(1, info.frames // seg + int(info.frames % seg >= info.samplerate))
            except Exception:
                yield (i + 1, 0), {"id": self.files[i], "error": "undecodable_audio"}
                continue
            for k in range(seg0 if i == file0 else 0, n):
                item = {"id": f"{self.files[i]}#{k}", "audio": path, "start": k * seg, "frames": seg, "text": "", "language": None}
                yield ((i, k + 1) if k + 1 < n else (i + 1, 0)), item


# -----------------------------------------------------------------------------
# the job: source -> filters -> splits, streaming, resumable


def _decoded(entries, workers, max_seconds, chunk=16):
    """(cursor, item, label, audio) for each (cursor, item, label), in order; audio is int16 samples,
    a filter name, or None where the label already dropped the row. With workers > 0 audio is decoded
    in a process pool, at most about 2 * workers chunks in flight, so memory stays bounded."""

    def job(item):
        return (item["audio"], item.get("start", 0), item.get("frames", -1), max_seconds)

    def wanted(entry):
        return entry[1] is not None and isinstance(entry[2], dict)

    if workers <= 0:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # short clips: threads cost more than they give, and on a busy machine far more
        try:
            for entry in entries:
                yield entry + (decode_audio(*job(entry[1])) if wanted(entry) else None,)
        finally:
            torch.set_num_threads(threads)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(workers, initializer=_init_worker) as pool:
        pending = deque()

        def submit(batch):
            pending.append((batch, pool.apply_async(_decode_chunk, ([job(e[1]) for e in batch if wanted(e)],))))

        def drain():
            batch, result = pending.popleft()
            decoded = iter(result.get())
            for e in batch:
                yield e + (next(decoded) if wanted(e) else None,)

        batch = []
        for entry in entries:
            batch.append(entry)
            if len(batch) == chunk:
                submit(batch)
                batch = []
                while len(pending) > 2 * workers:
                    yield from drain()
        if batch:
            submit(batch)
        while pending:
            yield from drain()


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a new line every 10 s otherwise."""

    def __init__(self, job):
        self.job, self.tty = job, sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def show(self, counts, samples, note="", final=False):
        now = time.monotonic()
        if (not final and now - self.last < (0.5 if self.tty else 10)) or (final and not self.tty):
            return  # off a terminal the report that follows says it all
        self.last = now
        hours, elapsed = samples / dw.SAMPLE_RATE / 3600, max(now - self.start, 1e-9)
        line = (f"{self.job}: {counts['seen']} rows, {counts['kept']} kept ({hours:.2f} h), {counts['seen'] - counts['kept']} dropped,"
                f" {samples / dw.SAMPLE_RATE / elapsed:.0f}x real time{note}")
        print(("\r" + line + "\033[K") if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


class _Lock:
    """An exclusive lock on an output folder, so that two runs never write into one folder."""

    def __init__(self, folder):
        self.path = Path(folder) / ".prepare.lock"

    def __enter__(self):
        self.file = open(self.path, "w")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no fcntl (Windows): no lock
        except OSError:
            self.file.close()
            raise PrepareError(f"another prepare.py is writing into {self.path.parent}; wait for it to finish") from None
        return self

    def __exit__(self, *exc):
        self.file.close()


def log(message):
    print(message, flush=True)


def run_job(out, job, source, splits, label, route, settings, workers=2, max_seconds=None, restart=False,
            checkpoint_every=5.0, log=log):
    """Prepare `source` into `splits` of folder `out`, resuming an interrupted run of the same job.
    label(item) -> {tokens, text, language} or a filter name; route(item) -> split name. Returns
    the job's entry of meta.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".prepare-{job}"
    fingerprint = hashlib.sha1(json.dumps({"format": FORMAT_VERSION, "job": job, "source": source.signature, "settings": settings},
                                          sort_keys=True).encode()).hexdigest()
    with _Lock(out):
        if restart:
            shutil.rmtree(work, ignore_errors=True)
        state = read_json(work / "state.json")
        if state is not None and state["fingerprint"] != fingerprint:
            if state["cursor"] is not None:
                raise PrepareError(f"{out} holds an unfinished preparation of another source or other settings ({work.name});"
                                   " run that command again to finish it, or add --restart to discard it")
            state = None  # it had written nothing yet
        meta = read_json(out / "meta.json") or {}
        if state is None:
            done = meta.get("jobs", {}).get(job, {})
            if done.get("fingerprint") == fingerprint and all((out / f"{s}.index.npy").exists() for s in splits):
                log(f"{job}: {out} is prepared already ({done['kept']} clips); add --restart to prepare it again")
                return done
            shutil.rmtree(work, ignore_errors=True)
            state = {"fingerprint": fingerprint, "cursor": None, "counts": {}, "splits": {}, "finished": False, "seconds": 0.0}
        elif not state["finished"]:
            log(f"{job}: resuming after {state['counts'].get('seen', 0)} rows ({state['counts'].get('kept', 0)} kept)")
        work.mkdir(parents=True, exist_ok=True)
        counts = Counter(state["counts"])
        counts.update({"seen": 0, "kept": 0})  # present even when zero

        if not state["finished"]:
            writers = {s: SplitWriter(out, s, work, state["splits"].get(s)) for s in splits}

            def save():
                for w in writers.values():
                    w.sync()
                state.update(cursor=cursor, counts=dict(counts), splits={s: w.state() for s, w in writers.items()},
                             seconds=state["seconds"] + time.monotonic() - t_saved)
                write_json_atomic(work / "state.json", state)

            cursor, t_saved, progress = state["cursor"], time.monotonic(), Progress(job)
            labelled = ((c, item, (item.get("error") or label(item)) if item is not None else None)
                        for c, item in source.items(state["cursor"], work))
            for cursor, item, lab, audio in _decoded(labelled, workers, max_seconds):
                if item is not None:
                    counts["seen"] += 1
                    reason = lab if isinstance(lab, str) else audio if isinstance(audio, str) else None
                    if reason:
                        counts[reason] += 1
                    else:
                        row = {"id": item["id"], "text": lab["text"], "language": lab["language"]}
                        if item.get("speaker") not in (None, ""):
                            row["speaker"] = str(item["speaker"])
                        writers[route(item)].add(audio, lab["tokens"], row)
                        counts["kept"] += 1
                if time.monotonic() - t_saved >= checkpoint_every:
                    save()
                    t_saved = time.monotonic()
                progress.show(counts, sum(w.samples for w in writers.values()), source.note)
            progress.show(counts, sum(w.samples for w in writers.values()), final=True)
            save()
            for w in writers.values():
                w.finish()
            state["finished"] = True
            write_json_atomic(work / "state.json", state)

        # publish: the splits (each index last), then meta.json, then the work folder goes
        for s in splits:
            publish_split(work, out, s)
        summaries = {s: state["splits"][s] for s in splits}
        meta.update(format_version=FORMAT_VERSION, sample_rate=dw.SAMPLE_RATE)
        for s, st in summaries.items():
            meta.setdefault("splits", {})[s] = {"clips": st["clips"], "hours": round(st["samples"] / dw.SAMPLE_RATE / 3600, 6),
                                                "samples": st["samples"], "tokens": st["tokens"], "languages": st["languages"]}
        dropped = {k: v for k, v in counts.items() if k in FILTERS and v}
        entry = {"source": source.description, "splits": list(splits), **settings, "seen": counts["seen"], "kept": counts["kept"],
                 "dropped": dropped, "seconds": round(state["seconds"], 3), "fingerprint": fingerprint}
        meta.setdefault("jobs", {})[job] = entry
        if "tokenizer" in settings:
            meta["tokenizer"] = settings["tokenizer"]
        write_json_atomic(out / "meta.json", meta)
        shutil.rmtree(work, ignore_errors=True)

    hours = sum(st["samples"] for st in summaries.values()) / dw.SAMPLE_RATE / 3600
    clips = ", ".join(f"{s} {st['clips']}" for s, st in summaries.items())
    rate = hours * 3600 / max(state["seconds"], 1e-9)
    log(f"{job}: {counts['seen']} rows seen, {counts['kept']} kept ({clips}; {hours:.3f} h), {counts['seen'] - counts['kept']} dropped"
        + (" (" + ", ".join(f"{k} {v}" for k, v in dropped.items()) + ")" if dropped else "")
        + f"; {state['seconds']:.1f} s, {rate:.0f}x real time -> {out}")
    return entry


def prepare_speech(out, source, model=DEFAULT_MODEL, language=None, task="transcribe", val_fraction=0.02,
                   max_seconds=dw.CHUNK_LENGTH, workers=2, restart=False, checkpoint_every=5.0, log=log):
    """Speech rows of `source` -> splits train and val of `out`, tokenized with the tokenizer of `model`."""
    if not 0 <= val_fraction <= 1:
        raise PrepareError(f"--val_fraction must be between 0 and 1, not {val_fraction}")
    if max_seconds is not None and not max_seconds > 0:
        raise PrepareError(f"--max_seconds must be positive, not {max_seconds}")
    tok, tok_info, n_text_ctx = resolve_tokenizer(model)
    transcripts = Transcripts(tok, language, task, n_text_ctx)
    if transcripts.language is None and not source.has_language:
        raise PrepareError("a multilingual tokenizer needs each clip's language: pass --language (e.g. az) or give a language column")
    settings = {"tokenizer": tok_info, "language": transcripts.language, "task": task, "val_fraction": val_fraction,
                "max_seconds": max_seconds, "n_text_ctx": n_text_ctx}
    given = getattr(source, "columns", {}).get("split") is not None  # a manifest's own split column
    return run_job(out, "speech", source, SPLITS if given else ("train", "val"), lambda item: transcripts(item.get("text"), item.get("language")),
                   lambda item: item["split"] if given else split_of(item["id"], val_fraction), settings, workers, max_seconds,
                   restart, checkpoint_every, log)


def prepare_noise(out, folder, workers=2, restart=False, checkpoint_every=5.0, log=log, split="noise"):
    """Every recording under `folder` -> split `split` of `out` (no tokens): noise for training, or
    noise_test, recordings kept for evaluation."""
    return run_job(out, split, NoiseSource(folder), (split,), lambda item: {"tokens": [], "text": "", "language": None},
                   lambda item: split, {"segment_seconds": NOISE_SEGMENT_SECONDS}, workers, None, restart, checkpoint_every, log)


# -----------------------------------------------------------------------------
# the demo: a small spoken corpus synthesised with espeak-ng, and a noise bank


DEMO_TEXTS = Path(__file__).resolve().parent / "demo"  # sentences.{language}.txt, written for this project
# the experiment corpus's grammar, written for this project: per language, templates whose {slots}
# are filled from word lists given already inflected, so that every sentence is grammatical
CORPUS_GRAMMAR = json.loads((DEMO_TEXTS / "corpus_grammar.json").read_text(encoding="utf-8"))
DEMO_VOICES = {"en": ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc"], "az": ["az"]}
DEMO_VAL_FRACTION = 0.1
DEMO_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]


def make_demo_source(folder, languages, n_sentences=None, val_fraction=0.1, workers=2, log=log):
    """Speak the demo sentences of `languages` with espeak-ng (a voice, variant, speed and pitch drawn
    per sentence) into folder/{language}/*.wav with folder/metadata.csv, and write a noise bank of
    coloured noise, mains hum and babble into folder/noise. Files that exist are kept."""
    if shutil.which("espeak-ng") is None:
        raise PrepareError("--demo needs espeak-ng (apt-get install espeak-ng, brew install espeak-ng)")
    folder = Path(folder)
    rows, todo = [], []
    for lang in languages:
        (folder / lang).mkdir(parents=True, exist_ok=True)
        sentences = (DEMO_TEXTS / f"sentences.{lang}.txt").read_text(encoding="utf-8").splitlines()
        for i, text in enumerate(sentences[:n_sentences]):
            rng = random.Random(f"{lang}-{i}")
            voice = f"{rng.choice(DEMO_VOICES[lang])}+{rng.choice(DEMO_VARIANTS)}"
            uid, rel = f"{lang}-{i:03d}", f"{lang}/{lang}-{i:03d}.wav"
            rows.append({"id": uid, "path": rel, "text": text, "language": lang})
            if not (folder / rel).exists():
                todo.append((folder / rel, ["-v", voice, "-s", str(rng.randint(135, 185)), "-p", str(rng.randint(25, 75))], text))

    if todo:
        log(f"demo: speaking {len(todo)} sentences with espeak-ng")
        speak(todo, workers)
    manifest = write_manifest(folder / "metadata.csv", rows)
    # babble only from clips of the train split, so that no validation sentence is heard in training
    make_demo_noise(folder / "noise", [folder / r["path"] for r in rows if split_of(r["id"], val_fraction) == "train"])
    return manifest, folder / "noise"


def speak(todo, workers=2):
    """Run espeak-ng on each (wav path, options, text) of `todo`, `workers` processes at a time;
    each file is written under a temporary name and renamed, so that a file that exists is whole."""
    def one(job):
        path, options, text = job
        tmp = path.with_name(path.stem + ".tmp.wav")
        result = subprocess.run(["espeak-ng", *options, "-w", str(tmp), text], capture_output=True, text=True)
        if result.returncode != 0 or not tmp.exists():
            raise PrepareError(f"espeak-ng failed on {text!r}: {result.stderr.strip()[:200]}")
        os.replace(tmp, path)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # threads that wait on espeak-ng processes
        list(pool.map(one, todo))


def write_manifest(path, rows):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def make_demo_noise(folder, speech_files, seconds=40, seed=0):
    """White, pink and brown noise, a 50 Hz mains hum and two babbles of the given speech clips."""
    import soundfile as sf
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, g = seconds * dw.SAMPLE_RATE, torch.Generator().manual_seed(seed)
    noises = {colour: dw.coloured_noise((n,), colour, generator=g).numpy() for colour in ("white", "pink", "brown")}
    t = np.arange(n) / dw.SAMPLE_RATE
    noises["hum"] = sum(np.sin(2 * np.pi * 50 * k * t + k) / k for k in range(1, 8)) + 0.05 * noises["white"]
    clips = [dw.load_audio(p) for p in speech_files[:24]]
    if len(clips) >= 2:
        rng = np.random.default_rng(seed)
        talkers = np.zeros((len(clips), n), dtype=np.float32)
        for row in range(len(clips)):  # each row: a stream of clips one after another, from a random start
            stream = np.concatenate([clips[j] for j in rng.permutation(len(clips))] * (1 + n // sum(map(len, clips))))
            talkers[row] = stream[:n]
        babble = dw.babble(torch.from_numpy(talkers), n_talkers=min(5, len(clips) - 1), generator=g).numpy()
        noises["babble1"], noises["babble2"] = babble[0], babble[1]
    for name, x in noises.items():
        path = folder / f"{name}.wav"
        if not path.exists():
            sf.write(folder / f"{name}.tmp.wav", 0.5 * x / np.abs(x).max(), dw.SAMPLE_RATE, subtype="PCM_16")
            os.replace(folder / f"{name}.tmp.wav", path)


# -----------------------------------------------------------------------------
# the experiment corpus: thousands of generated sentences, many espeak-ng voices, a held-out test
# split whose sentences and voices never occur in training, and noise recordings split likewise

CORPUS_VOICES = {"en": ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"],
                 "az": ["az"]}
# espeak-ng's voice variants that stay intelligible (no whispers, robots or croaks): each is a
# talker's timbre; every fifth is kept for the test split only
CORPUS_VARIANTS = sorted("""m1 m2 m3 m4 m5 m6 m7 m8 f1 f2 f3 f4 f5 klatt klatt2 klatt3 klatt4 adam Alex Alicia Andrea Andy Annie
    antonio aunty belinda benjamin boris caleb david ed edward edward2 Gene Gene2 gustave Henrique Hugo iven iven2 iven3 iven4
    Jacky john kaukovalta Lee linda marcelo Marco Mario max Michael michel miguel Mike Nguyen pablo paul pedro quincy rob
    robert steph steph2 steph3 travis victor zac anika norbert sandro shelby grandpa grandma""".split(), key=str.lower)
TEST_VARIANTS = CORPUS_VARIANTS[2::5]
CORPUS_FRACTIONS = {"test": 0.1, "val": 0.05}  # of the distinct sentences, chosen by a hash of the text
SECONDS_PER_SENTENCE = 2.6  # about, at the rates drawn below: how many sentences make --hours


def corpus_split(text, fractions=CORPUS_FRACTIONS):
    """test, val or train from a hash of the sentence alone: a sentence is in one split only."""
    u = int.from_bytes(hashlib.blake2b(text.lower().encode("utf-8"), digest_size=8).digest(), "big") / 2**64
    return "test" if u < fractions["test"] else "val" if u < fractions["test"] + fractions["val"] else "train"


def generate_sentences(language, n, seed=0):
    """n distinct sentences drawn from the language's grammar (CORPUS_GRAMMAR), the same for the
    same (language, n, seed)."""
    grammar = CORPUS_GRAMMAR[language]
    rng = random.Random(f"{language}-{seed}")
    out, seen = [], set()
    for _ in range(50 * n):
        template = rng.choice(grammar["templates"])
        text = re.sub(r"\{([a-z_]+?)(\d?)\}", lambda m: rng.choice(grammar[m.group(1)]), template)
        if grammar.get("question_particle") and "{Q}" in text:  # Azerbaijani: mı/mi/mu/mü after the verb's last vowel
            vowel = [c for c in text.split("{Q}")[0] if c in "aıoueəiöü"][-1]
            text = text.replace("{Q}", {"a": "mı", "ı": "mı", "o": "mu", "u": "mu", "e": "mi", "ə": "mi", "i": "mi", "ö": "mü", "ü": "mü"}[vowel])
        text = text[0].upper() + text[1:]
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
            if len(out) == n:
                return out
    raise PrepareError(f"the {language} grammar yields only {len(out)} distinct sentences, fewer than the {n} asked for; ask for fewer --hours")


def make_corpus_source(folder, languages, hours, seed=0, workers=2, log=log):
    """Speak generated sentences into folder/{language}/*.wav with folder/metadata.csv (id, path,
    text, language, split, voice, and speaker: the voice's variant, its timbre whatever the
    accent): each distinct sentence once, in the split its text hashes to,
    by a voice of that split (TEST_VARIANTS for test, the other variants for train and val) at a
    drawn rate and pitch. Then noise recordings: folder/noise (training) and folder/noise_test."""
    if shutil.which("espeak-ng") is None:
        raise PrepareError("--corpus needs espeak-ng (apt-get install espeak-ng, brew install espeak-ng)")
    unknown = [lang for lang in languages if lang not in CORPUS_GRAMMAR]
    if unknown:
        raise PrepareError(f"--languages: no corpus grammar for {unknown[0]!r}; there are {', '.join(CORPUS_GRAMMAR)}")
    if not hours > 0:
        raise PrepareError(f"--hours must be positive, not {hours}")
    folder = Path(folder)
    n = max(20, round(hours * 3600 / SECONDS_PER_SENTENCE / len(languages)))
    rows, todo = [], []
    for lang in languages:
        (folder / lang).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(generate_sentences(lang, n, seed)):
            split = corpus_split(text)
            rng = random.Random(f"{lang}-{seed}-{i}")
            variant = rng.choice(TEST_VARIANTS if split == "test" else [v for v in CORPUS_VARIANTS if v not in TEST_VARIANTS])
            voice = f"{rng.choice(CORPUS_VOICES[lang])}+{variant}"
            uid = f"{lang}-{i:06d}-{variant}"
            rel = f"{lang}/{uid}.wav"
            rows.append({"id": uid, "path": rel, "text": text, "language": lang, "split": split, "voice": voice, "speaker": variant})
            if not (folder / rel).exists():
                todo.append((folder / rel, ["-v", voice, "-s", str(rng.randint(130, 190)), "-p", str(rng.randint(20, 80))], text))
    if todo:
        log(f"corpus: speaking {len(todo)} sentences with espeak-ng ({workers} processes at a time)")
        speak(todo, workers)
    manifest = write_manifest(folder / "metadata.csv", rows)
    train = [folder / r["path"] for r in rows if r["split"] == "train"]
    make_corpus_noise(folder / "noise", folder / "noise_test", train, seed)
    return manifest, folder / "noise", folder / "noise_test"


def make_corpus_noise(train_folder, test_folder, train_speech, seed=0, seconds=30, pieces=3):
    """Synthesised noise recordings, different pieces for training and for testing. Both: mains
    hum (a random fundamental and harmonics), band-limited noise, a fan (rumble and a blade tone);
    training also babble of training talkers; testing also kinds that training never hears:
    music (chords of harmonic notes) and clatter (decaying resonant knocks)."""
    import soundfile as sf

    n, sr = seconds * dw.SAMPLE_RATE, dw.SAMPLE_RATE
    t = np.arange(n) / sr

    def band(rng, lo, hi, colour=0.0):
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / sr)
        spec *= ((f >= lo) & (f <= hi)) / np.maximum(f, 1.0) ** (colour / 2)
        return np.fft.irfft(spec, n)

    def hum(rng):
        f0 = rng.choice([50.0, 60.0]) * rng.uniform(0.98, 1.02)
        return sum(rng.uniform(0.2, 1) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in range(1, 10)) + 0.02 * rng.standard_normal(n)

    def bandnoise(rng):
        lo = rng.uniform(100, 2000)
        return band(rng, lo, lo * rng.uniform(1.5, 4))

    def fan(rng):
        x = band(rng, 20, 600, colour=1.0)
        x /= np.abs(x).max()
        blade = rng.uniform(80, 300)
        return x + 0.3 * np.sin(2 * np.pi * blade * t) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t))

    def music(rng):
        x, start = np.zeros(n), 0
        while start < n:
            length = int(sr * rng.uniform(0.2, 0.8))
            env = np.exp(-np.arange(length) / (sr * rng.uniform(0.1, 0.4)))
            for semis in rng.choice([0, 3, 4, 7, 10, 12], size=rng.integers(1, 4), replace=False):
                f = 220 * 2 ** ((rng.integers(-12, 13) + semis) / 12)
                tt = np.arange(length) / sr
                note = sum(np.sin(2 * np.pi * f * h * tt) / h ** 1.5 for h in range(1, 6))
                x[start:start + length] += (env * note)[: n - start]
            start += length
        return x

    def clatter(rng):
        x = np.zeros(n)
        for at in np.sort(rng.integers(0, n, size=int(seconds * rng.uniform(2, 8)))):
            length = min(int(sr * rng.uniform(0.03, 0.15)), n - at)
            tt = np.arange(length) / sr
            x[at:at + length] += rng.uniform(0.3, 1) * sum(np.sin(2 * np.pi * rng.uniform(500, 5000) * tt) for _ in range(3)) * np.exp(-tt / rng.uniform(0.01, 0.05))
        return x + 0.01 * rng.standard_normal(n)

    kinds = {"train": {"hum": hum, "band": bandnoise, "fan": fan},
             "test": {"hum": hum, "band": bandnoise, "fan": fan, "music": music, "clatter": clatter}}
    for part, folder in (("train", Path(train_folder)), ("test", Path(test_folder))):
        folder.mkdir(parents=True, exist_ok=True)
        for kind, make in kinds[part].items():
            for k in range(pieces):
                path = folder / f"{kind}{k}.wav"
                if not path.exists():
                    x = make(np.random.default_rng([seed, part == "test", k, *kind.encode()]))
                    sf.write(folder / f"{kind}{k}.tmp.wav", 0.5 * x / np.abs(x).max(), sr, subtype="PCM_16")
                    os.replace(folder / f"{kind}{k}.tmp.wav", path)
    make_demo_noise(train_folder, train_speech[:200], seconds=seconds, seed=seed)  # white, pink, brown, hum, babble of training talkers
    for colour in ("white", "pink"):  # kept out of training: white and pink are conditions of their own at test time
        (Path(train_folder) / f"{colour}.wav").unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=dw.HelpFormatter)
    src = parser.add_argument_group("sources (one speech source, and/or --noise_dir)")
    src.add_argument("--input", "--audio_dir", dest="input", help="a folder of audio files with one manifest (JSON list, JSON lines, CSV, TSV: path, text, "
                                     "optional language, speaker, id) or a .txt transcript beside each file; or the manifest itself")
    src.add_argument("--transcripts", metavar="MANIFEST", help="the manifest to read, when it is not in the --input folder: "
                                                               "its paths are relative to that folder")
    src.add_argument("--hf_dataset", help="a Hugging Face dataset id (e.g. LocalDoc/azerbaijani_asr) or a local folder of its parquet shards")
    src.add_argument("--hf_split", default="train", help="which shards: those whose path names this split")
    src.add_argument("--hf_audio_column", default="audio", help="column of encoded audio ({bytes, path} structs or bytes)")
    src.add_argument("--hf_text_column", default="text", help="column of transcripts")
    src.add_argument("--hf_id_column", default=None, help="column of utterance ids (default: shard name and row)")
    src.add_argument("--hf_language_column", default=None, help="column of per-row languages (default: --language for all)")
    src.add_argument("--hf_speaker_column", default=None, help="column of speaker ids (e.g. client_id), for train.py --pack_by speaker")
    src.add_argument("--hf_revision", default=None, help="dataset revision on the hub (default: the latest, pinned for a resume)")
    src.add_argument("--noise_dir", help="a folder of noise recordings: prepared into split 'noise' for augmentation")
    src.add_argument("--demo", action="store_true", help="synthesise a small English (and, with a multilingual --model, Azerbaijani) "
                                                         "corpus and noise bank with espeak-ng and prepare them (default --out data/demo)")
    src.add_argument("--demo_sentences", type=int, default=None, help="speak only the first N demo sentences of each language")
    src.add_argument("--corpus", metavar="OUT", help="synthesise an experiment corpus into OUT with espeak-ng: generated sentences, "
                                                     "many voices, splits train, val and test (test sentences and voices never in "
                                                     "training), noise recordings for training (noise) and for testing only (noise_test)")
    src.add_argument("--hours", type=float, default=1.0, help="--corpus: about this much speech in all")
    src.add_argument("--languages", default=None, help="--corpus: comma-separated, of en, az (default: en, and az with a multilingual --model)")
    src.add_argument("--seed", type=int, default=0, help="--corpus: seed of the sentences, voices and noise")
    parser.add_argument("--noise_split", default="noise", choices=["noise", "noise_test"],
                        help="--noise_dir goes into this split: noise (training) or noise_test (evaluation only)")
    parser.add_argument("--out", "--output_dir", dest="out", help="output folder")
    parser.add_argument("--model", "--tokenizer", dest="model", default=DEFAULT_MODEL,
                        help="the model whose tokenizer to use: a folder, an official name (tiny.en, small) or a hub id")
    parser.add_argument("--language", default=None, help="language of every clip without its own (code or name, e.g. az); "
                                                         "English for an English-only tokenizer")
    parser.add_argument("--task", default="transcribe", choices=["transcribe", "translate"],
                        help="the task token of every clip (translate: its transcript is English, whatever it speaks)")
    parser.add_argument("--val_fraction", type=float, default=None, help="fraction of utterance ids for validation, chosen by hash "
                                                                          f"(default 0.02; {DEMO_VAL_FRACTION} for --demo)")
    parser.add_argument("--max_seconds", type=float, default=dw.CHUNK_LENGTH, help="drop clips longer than this")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="audio decoding processes (0: in this process)")
    parser.add_argument("--restart", action="store_true", help="discard an unfinished or finished earlier run and prepare again")
    parser.add_argument("--checkpoint_every", type=float, default=5.0, help="seconds between saves of the progress")
    args = parser.parse_args(argv)

    try:
        if sum(map(bool, (args.input or args.transcripts, args.hf_dataset, args.demo, args.corpus))) > 1:
            raise PrepareError("give one speech source: --input, --hf_dataset, --demo or --corpus")
        if args.transcripts and not Path(args.transcripts).is_file():
            raise PrepareError(f"--transcripts {args.transcripts}: no such file")
        if not (args.input or args.transcripts or args.hf_dataset or args.demo or args.corpus or args.noise_dir):
            raise PrepareError("nothing to prepare: give --input, --hf_dataset, --noise_dir, --demo or --corpus (see --help)")
        out = args.corpus or args.out or ("data/demo" if args.demo else None)
        if out is None:
            raise PrepareError("--out is required: the folder to write the prepared data into")
        common = dict(workers=args.workers, restart=args.restart, checkpoint_every=args.checkpoint_every)
        speech = dict(model=args.model, language=args.language, task=args.task, max_seconds=args.max_seconds,
                      val_fraction=args.val_fraction if args.val_fraction is not None else (DEMO_VAL_FRACTION if args.demo else 0.02))
        t0 = time.monotonic()
        if args.demo:
            tok, _, _ = resolve_tokenizer(args.model)
            languages = ["en", "az"] if tok.multilingual else ["en"]
            if args.language:
                languages = [Transcripts(tok, args.language).language]
            manifest, noise = make_demo_source(Path(out) / "source", languages, args.demo_sentences, speech["val_fraction"], args.workers)
            prepare_speech(out, LocalSource(manifest), **speech, **common)
            prepare_noise(out, args.noise_dir or noise, **common)
        elif args.corpus:
            tok, _, _ = resolve_tokenizer(args.model)
            languages = args.languages.split(",") if args.languages else ["en", "az"] if tok.multilingual else ["en"]
            if not tok.multilingual and set(languages) - {"en"}:
                raise PrepareError(f"--languages {args.languages}: {args.model} is English-only; pass a multilingual --model "
                                   "(e.g. ../shared/tokenizers/whisper-multilingual)")
            manifest, noise, noise_test = make_corpus_source(Path(out) / "source", languages, args.hours, args.seed, args.workers)
            prepare_speech(out, LocalSource(manifest), **speech, **common)
            prepare_noise(out, noise, **common)
            prepare_noise(out, noise_test, split="noise_test", **common)
        else:
            if args.input or args.transcripts or args.hf_dataset:
                if args.hf_dataset:
                    source = ParquetSource(args.hf_dataset, args.hf_split, args.hf_audio_column, args.hf_text_column,
                                           args.hf_id_column, args.hf_language_column, args.hf_revision, args.hf_speaker_column)
                else:  # --transcripts: a manifest kept apart from the audio folder
                    source = LocalSource(args.transcripts or args.input, audio_dir=args.input if args.transcripts else None)
                prepare_speech(out, source, **speech, **common)
            if args.noise_dir:
                prepare_noise(out, args.noise_dir, split=args.noise_split, **common)
        print(f"done in {time.monotonic() - t0:.1f} s: {out} (read it with prepare.PreparedSplit)")
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nprepare.py: interrupted; run the same command again to go on from the last save", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a vanished folder: what was saved is kept
        print(f"prepare.py: error: {e}; fix it and run the same command again to go on from the last save", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
