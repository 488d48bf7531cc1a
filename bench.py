"""
bench.py: timings against baselines measured in the same run, printed as ratios.

  python bench.py transcribe   sample.py's transcription vs openai-whisper (and faster-whisper /
                               transformers where installed)
  python bench.py train        training samples/s vs transformers' Whisper in the same loop
  python bench.py prepare      hours of audio prepared per minute, and batch read speed
"""

import argparse
import sys


def bench_transcribe(args):
    raise SystemExit("not written yet")


def bench_train(args):
    raise SystemExit("not written yet")


def bench_prepare(args):
    """prepare.py's speed on this machine: hours of audio prepared per minute (and x real time) for
    16 kHz wav files, 44.1 kHz stereo flac (decoded, mixed down, resampled) and Hugging Face style
    parquet shards; then how much faster a prepared training batch is read than a training step of
    tiny.en (log-mel, forward, backward) consumes it. Inputs are made from ../shared/audio/jfk.flac
    and prepared from the page cache, as a second epoch over a dataset on a local disk would be."""
    import os
    import shutil
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    import soundfile as sf
    import torch

    import dualwhisper as dw
    import prepare

    p = argparse.ArgumentParser(prog="bench.py prepare", description=bench_prepare.__doc__)
    p.add_argument("--hours", type=float, default=1.0, help="hours of 16 kHz wav (flac and parquet get a quarter and a half of it)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare.py --workers")
    p.add_argument("--model", default=prepare.DEFAULT_MODEL, help="model for the tokenizer and the training step")
    p.add_argument("--batch_size", type=int, default=8, help="batch of 30-second windows for the read / train comparison")
    p.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, deleted at the end)")
    a = p.parse_args(args)

    work = Path(a.dir or tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    jfk_path = prepare.SHARED / "audio" / "jfk.flac"
    raw, raw_sr = sf.read(jfk_path, dtype="float32") if jfk_path.exists() else (rng.standard_normal(44100 * 11).astype("float32") * 0.1, 44100)
    raw = raw.mean(axis=1) if raw.ndim == 2 else raw
    words = "and so my fellow americans ask not what your country can do for you ask what you can do for your country".split()

    def clips(hours, sr):
        """(samples, text) of 3 to 15 s crops of the looped recording at `sr`, with a little noise so that no two are equal."""
        loop = np.tile(dw.resample(raw, raw_sr, sr) if sr != raw_sr else raw, 2)
        total = 0.0
        while total < hours * 3600:
            seconds = rng.uniform(3, 15)
            n = int(seconds * sr)
            start = rng.integers(0, len(loop) - n)
            yield loop[start: start + n] + 0.003 * rng.standard_normal(n).astype("float32"), " ".join(rng.choice(words, int(seconds * 2.5)))
            total += seconds

    def write_folder(name, hours, sr, fmt, stereo=False):
        folder = work / name
        folder.mkdir(exist_ok=True)
        rows = []
        for i, (x, text) in enumerate(clips(hours, sr)):
            path = f"{i:05d}.{fmt}"
            sf.write(folder / path, np.stack([x, 0.9 * x], 1) if stereo else x, sr, subtype="PCM_16")
            rows.append(f"{path},{text}")
        (folder / "metadata.csv").write_text("path,text\n" + "\n".join(rows) + "\n")
        return ["--input", str(folder / "metadata.csv")]

    def write_parquet(name, hours):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = work / name / "data"
        folder.mkdir(parents=True, exist_ok=True)
        audio_type, shard, rows = pa.struct([("bytes", pa.binary()), ("path", pa.string())]), 0, []

        def flush():
            table = pa.table({"audio": pa.array([{"bytes": b, "path": f"{k}.wav"} for k, (b, _) in enumerate(rows)], audio_type),
                              "text": [t for _, t in rows]})
            pq.write_table(table, folder / f"train-{shard:05d}.parquet", row_group_size=100)

        for x, text in clips(hours, 16000):
            buf = io.BytesIO()
            sf.write(buf, x, 16000, format="WAV", subtype="PCM_16")
            rows.append((buf.getvalue(), text))
            if len(rows) == 200:
                flush()
                shard, rows = shard + 1, []
        if rows:
            flush()
        return ["--hf_dataset", str(work / name)]

    inputs = [("16 kHz wav", lambda: write_folder("wav16", a.hours, 16000, "wav")),
              ("44.1 kHz stereo flac", lambda: write_folder("flac44", a.hours / 4, 44100, "flac", stereo=True))]
    try:
        import pyarrow  # noqa: F401

        inputs.append(("parquet shards (wav bytes)", lambda: write_parquet("parquet", a.hours / 2)))
    except ImportError:
        print("pyarrow is not installed: the parquet case is left out (pip install pyarrow)")
    print(f"prepare.py on {os.cpu_count()} cores, --workers {a.workers}; inputs made in {work}")
    try:
        for name, make in inputs:
            source = make()
            out = work / ("out-" + name.split()[0])
            t0 = time.perf_counter()
            rc = prepare.main(source + ["--out", str(out), "--model", a.model, "--workers", str(a.workers), "--restart"])
            wall = time.perf_counter() - t0
            assert rc == 0, f"prepare.py failed on the {name} input"
            meta = prepare.PreparedSplit(out, "train").meta
            hours = sum(meta["splits"][s]["hours"] for s in ("train", "val"))
            print(f"RESULT prepare {name:28s}: {hours:.3f} h in {wall:.1f} s = {hours / wall * 60:.2f} h of audio per minute,"
                  f" {hours * 3600 / wall:.0f}x real time (target for wav: 100x)")

        # reading a batch vs a training step consuming it
        split = prepare.PreparedSplit(work / "out-16", "train")
        order = rng.permutation(len(split))
        batches = [order[i: i + a.batch_size] for i in range(0, len(order) - a.batch_size + 1, a.batch_size)]
        split.batch(batches[0])  # warm
        read = {}
        for dtype in (np.float32, np.int16):
            t0 = time.perf_counter()
            for b in batches:
                split.batch(b, dtype=dtype)
            read[dtype] = (time.perf_counter() - t0) / len(batches)

        if a.steps:
            model = dw.load_model(a.model).train()
            audio, tokens = split.batch(batches[0])
            seq = torch.full((len(tokens), max(map(len, tokens))), -100, dtype=torch.long)  # -100: padding, ignored by the loss
            for i, t in enumerate(tokens):
                seq[i, : len(t)] = torch.from_numpy(t)
            inputs_, targets = seq[:, :-1].clamp_min(0), seq[:, 1:]

            def step():
                mel = dw.log_mel_spectrogram(torch.from_numpy(audio), model.dims.n_mels)[..., : dw.N_FRAMES]
                model(mel, inputs_, targets).backward()
                model.zero_grad(set_to_none=True)

            step()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            train = (time.perf_counter() - t0) / a.steps
        for dtype, name in ((np.float32, "float32"), (np.int16, "int16")):
            print(f"RESULT read a batch of {a.batch_size} x 30 s as {name} from the prepared split: {read[dtype] * 1e3:.1f} ms"
                  f" ({a.batch_size / read[dtype]:.0f} clips/s, one thread, {len(batches)} random batches)")
        if a.steps:
            print(f"RESULT tiny.en training step on it (log-mel + forward + backward, {torch.get_num_threads()} CPU threads):"
                  f" {train * 1e3:.0f} ms = {a.batch_size / train:.2f} clips/s")
            print(f"RESULT reading (float32) is {train / read[np.float32]:.0f}x faster than this training step consumes it (target: 10x);"
                  f" on a GPU compare {a.batch_size / read[np.float32]:.0f} clips/s with train.py's samples/s")
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["transcribe", "train", "prepare"])
    args, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    {"transcribe": bench_transcribe, "train": bench_train, "prepare": bench_prepare}[args.what](rest)
