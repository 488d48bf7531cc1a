"""
prepare.py: turn speech datasets into dualwhisper's training format.

The format (one output folder, in the spirit of nanoGPT's train.bin), per split (train, val, noise):
  {split}.audio.bin    every clip's 16 kHz audio as int16 samples, one after another
  {split}.tokens.bin   every clip's decoder tokens as uint16: <|startoftranscript|> [language task]
                       <|notimestamps|> text tokens <|endoftext|>
  {split}.index.npy    one row per clip: audio_offset, audio_len, token_offset, token_len
  {split}.jsonl        one JSON object per clip: id, text, language
  meta.json            counts, hours, tokenizer, source, filter report
"""

import json
import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
INDEX_DTYPE = np.dtype([("audio_offset", "<i8"), ("audio_len", "<i8"), ("token_offset", "<i8"), ("token_len", "<i4")])

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

    def row(self, i):
        """id, text and language of clip i."""
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


class SplitWriter:
    """Append clips to one split; `close()` renames the finished files into place, so that a
    reader never sees a half-written split."""

    def __init__(self, folder, split):
        self.folder, self.split = Path(folder), split
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tmp = {kind: self.folder / f"{split}.{kind}.tmp" for kind in ("audio.bin", "tokens.bin", "jsonl")}
        self.files = {kind: open(path, "wb") for kind, path in self.tmp.items()}
        self.rows = []
        self.audio_offset = self.token_offset = 0

    def add(self, audio, tokens, row):
        """audio: float samples in [-1, 1] at 16 kHz; tokens: the full decoder sequence; row: a dict
        with at least id and text."""
        pcm = np.clip(np.round(np.asarray(audio, dtype=np.float32) * 32767.0), -32768, 32767).astype("<i2")
        toks = np.asarray(tokens, dtype="<u2")
        self.files["audio.bin"].write(pcm.tobytes())
        self.files["tokens.bin"].write(toks.tobytes())
        self.files["jsonl"].write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self.rows.append((self.audio_offset, len(pcm), self.token_offset, len(toks)))
        self.audio_offset += len(pcm)
        self.token_offset += len(toks)

    def close(self):
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        index = np.array(self.rows, dtype=INDEX_DTYPE)
        tmp_index = self.folder / f"{self.split}.index.tmp.npy"
        np.save(tmp_index, index)
        for kind, path in self.tmp.items():
            os.replace(path, self.folder / f"{self.split}.{kind}")
        os.replace(tmp_index, self.folder / f"{self.split}.index.npy")  # last: the index marks a complete split
        return len(index), float(index["audio_len"].sum()) / 16000 / 3600 if len(index) else 0.0
