"""
sample.py: transcribe audio files with dualwhisper, or measure word error rates on a data set.

  python sample.py audio.wav                                  # text on stdout
  python sample.py talk.mp3 --model ../shared/models/whisper-tiny.en --beam_size 5
  python sample.py clips/*.wav --batch_size 16 --output_format srt --output_dir out/
  python sample.py --eval data/az --split val --snr 10 5 0 --noise babble
  python sample.py --eval manifest.jsonl                      # {"path": ..., "text": ...} per line

Transcription follows openai-whisper's `transcribe` (same options, same text and timestamps on the
same weights); the work is done by `transcribe_many` in dualwhisper.py, which decodes the current
30-second windows of up to --batch_size files together.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dualwhisper as dw

DEFAULT_MODEL = "small"

# -----------------------------------------------------------------------------
# output files, written to a temporary name and renamed into place


def write_atomic(path, text):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, dw.plain_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _cues(result, decimal_marker):
    for i, s in enumerate(s for s in result["segments"] if s["text"].strip()):
        start = dw.format_timestamp(s["start"], always_include_hours=True, decimal_marker=decimal_marker)
        end = dw.format_timestamp(s["end"], always_include_hours=True, decimal_marker=decimal_marker)
        yield i + 1, start, end, s["text"].strip().replace("-->", "->")


def to_txt(result):
    return "".join(s["text"].strip() + "\n" for s in result["segments"] if s["text"].strip())


def to_srt(result):
    return "".join(f"{i}\n{a} --> {b}\n{text}\n\n" for i, a, b, text in _cues(result, ","))


def to_vtt(result):
    return "WEBVTT\n\n" + "".join(f"{a} --> {b}\n{text}\n\n" for _, a, b, text in _cues(result, "."))


def to_json(result):
    keys = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob", "gate")
    segments = [json.dumps({k: s[k] for k in keys if k in s}, ensure_ascii=False) for s in result["segments"]]
    head = json.dumps({"text": result["text"], "language": result["language"]}, ensure_ascii=False)[:-1]
    return head + ', "segments": [' + "".join(f"\n  {s}," for s in segments).rstrip(",") + "\n]}\n"


WRITERS = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json}


# -----------------------------------------------------------------------------
# evaluation sets: a prepare.py folder, or a manifest of audio paths and transcripts


def read_eval_set(data, split):
    """(clips, texts, languages): clips are float arrays (prepared data) or paths (manifests, read as
    prepare.py reads them)."""
    from prepare import LocalSource, PreparedSplit, PrepareError

    data = Path(data)
    if data.is_dir():
        ps = PreparedSplit(data, split)
        rows = [ps.row(i) for i in range(len(ps))]
        return ps, [r["text"] for r in rows], [r.get("language") for r in rows]
    if not data.is_file():
        raise FileNotFoundError(f"--eval {data}: no such file or folder")
    try:
        items = [item for _, item in LocalSource(data).items()]
    except PrepareError as e:
        raise ValueError(str(e)) from None
    for n, item in enumerate(items, 1):
        if "error" in item or item["text"] is None:
            raise ValueError(f"{data}: row {n} lacks a path or a text, or is not valid JSON or CSV")
    return [item["audio"] for item in items], [item["text"] for item in items], [item["language"] for item in items]


class _Clips:
    """Float samples of the evaluation clips, loaded once: the pool that babble and talker noise
    are drawn from, and what the noise is added to."""

    def __init__(self, clips, n):  # the first n
        self.clips, self.n, self.cache = clips, n, {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i not in self.cache:
            c = self.clips
            if hasattr(c, "audio"):
                self.cache[i] = np.asarray(c.audio(i), dtype=np.float32) / 32768.0
            else:
                self.cache[i] = dw.load_audio(c[i])
        return self.cache[i]


def noise_bank(folder):
    from prepare import AUDIO_SUFFIXES, audio_files

    files = audio_files(folder)  # the order of prepare.py --noise_dir
    recordings = [a for a in (dw.load_audio(Path(folder) / f) for f in files) if len(a)]  # an empty one would add nothing
    if not recordings:
        raise ValueError(f"--noise {folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) with samples in that folder")
    return recordings


def evaluate(model, args, options):
    clips, refs, languages = read_eval_set(args.eval, args.split)
    if args.limit:
        refs, languages = refs[:args.limit], languages[:args.limit]
    if len(refs) == 0:
        raise ValueError(f"--eval {args.eval}: the set is empty")
    if not any(str(r or "").strip() for r in refs):  # a noise split, say
        raise ValueError(f"--eval {args.eval}: no clip has a reference text to score against")
    tokenizer = dw.get_tokenizer(model)
    if args.language or not tokenizer.multilingual:
        languages = None
    else:  # a row's language when the model knows it, else detected
        languages = [lang if lang in tokenizer.language_codes else None for lang in languages]
    pool = _Clips(clips, len(refs))
    english = (args.language or "en") == "en" if languages is None else all(lang in (None, "en") for lang in languages)
    conditions = [("clean", None)]
    if args.snr:
        bank = None
        kind = args.noise
        if kind not in dw.NOISE_KINDS:
            bank, kind = noise_bank(kind), "bank"
        if kind in ("babble", "talker") and len(pool) < 2:
            raise ValueError(f"--noise {kind} mixes in other clips of the set: it needs at least two")
        for snr in args.snr:
            conditions.append((f"{args.noise if kind != 'bank' else 'noise files'} {snr:g} dB",
                               dw.NoiseMixer.fixed(kind, snr, bank=bank, pool=pool, seed=args.seed)))
    print(f"{'condition':<24} {'clips':>6} {'WER':>8} {'CER':>8} {'seconds':>8}")
    for name, mixer in conditions:
        t0 = time.time()
        audios = (pool[i] if mixer is None else mixer(torch.from_numpy(pool[i])[None], [len(pool[i])], [i], exclude=[i])[0].numpy()
                  for i in range(len(pool)))
        hyps = [None] * len(pool)
        progress = False if sys.stderr.isatty() else None  # a progress bar on a terminal
        for i, result in dw.transcribe_many(model, audios, batch_size=args.batch_size, languages=languages, verbose=progress, **options):
            if isinstance(result, Exception):
                raise ValueError(f"clip {i} of {args.eval}: {result}")
            hyps[i] = result["text"]
        counts = dw.error_counts(refs, hyps, languages or [None if english else "other"] * len(refs))
        wer, cer = dw.error_rates(counts)
        print(f"{name:<24} {counts['clips']:>6} {100 * wer:>7.2f}% {100 * cer:>7.2f}% {time.time() - t0:>8.1f}", flush=True)


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dw.HelpFormatter)
    p.add_argument("audio", nargs="*", help="audio files to transcribe (wav, flac, ogg, mp3; m4a, mp4, webm and the rest of what ffmpeg reads with PyAV installed)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="official name (tiny.en, small, large-v3, turbo, ...), Hugging Face id, local "
                                                         "checkpoint folder, OpenAI .pt file, or a train.py output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (pays off on long jobs)")
    p.add_argument("--batch_size", type=int, default=8, help="windows (of different files) decoded together")
    g = p.add_argument_group("output")
    g.add_argument("--output_format", "-f", choices=["txt", "srt", "vtt", "json", "all"], default=None,
                   help="write files of this format (default: text on stdout only)")
    g.add_argument("--output_dir", "-o", default=None, help="folder for the files (default: the current one)")
    g.add_argument("--verbose", action="store_true", help="print each segment with its times as it is decoded")
    g = p.add_argument_group("decoding (as openai-whisper)")
    g.add_argument("--task", choices=["transcribe", "translate"], default="transcribe", help="translate: any language to English")
    g.add_argument("--language", default=None, help="spoken language (code or name); default: detected on multilingual models")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the first try")
    g.add_argument("--temperature_increment_on_fallback", type=float, default=0.2,
                   help="temperature step of the retries of a failed window, up to 1.0 (0: no retries)")
    g.add_argument("--best_of", type=int, default=5, help="samples per retry at temperature > 0")
    g.add_argument("--beam_size", type=int, default=None, help="beam search with this many beams at temperature 0 (default: greedy)")
    g.add_argument("--patience", type=float, default=None, help="beam search goes on until beam_size * patience sequences finish")
    g.add_argument("--length_penalty", type=float, default=None, help="alpha of the length penalty (default: logprob / length)")
    g.add_argument("--suppress_tokens", default="-1", help="comma-separated token ids never emitted; -1: the model's non-speech symbols")
    g.add_argument("--initial_prompt", default=None, help="text given as the previous text of the first window (names, spelling, style)")
    g.add_argument("--condition_on_previous_text", type=_bool, default=True, help="give each window the text so far as its prompt")
    g.add_argument("--compression_ratio_threshold", type=_none_or(float), default=2.4, help="retry a window whose text gzips better than this")
    g.add_argument("--logprob_threshold", type=_none_or(float), default=-1.0, help="retry a window whose mean token logprob is below this")
    g.add_argument("--no_speech_threshold", type=_none_or(float), default=0.6,
                   help="skip a window whose no-speech probability is above this and whose logprob is below logprob_threshold")
    g.add_argument("--without_timestamps", action="store_true", help="decode text only (segments then span whole windows)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default=None, metavar="DATA", help="a prepare.py folder or a manifest (JSON list or lines, CSV or TSV with path,text)")
    g.add_argument("--split", default="val", help="split of a prepared folder")
    g.add_argument("--limit", type=int, default=0, help="evaluate the first N clips only")
    g.add_argument("--snr", type=float, nargs="*", default=[], help="also evaluate with noise at these SNRs (dB)")
    g.add_argument("--noise", default="white", help=f"noise of --snr: {', '.join(k for k in dw.NOISE_KINDS if k != 'bank')}, or a folder of noise recordings")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise")
    args = p.parse_args(argv)
    if not args.audio and not args.eval:
        p.error("give audio files to transcribe, or --eval DATA")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    return args


def _bool(s):
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, not {s!r}")


def _none_or(kind):
    def parse(s):
        return None if s.lower() == "none" else kind(s)
    return parse


def decode_options(args):
    """The options of transcribe_many from the command line, as openai-whisper's CLI builds them."""
    if args.temperature_increment_on_fallback:
        temperature = tuple(np.arange(args.temperature, 1.0 + 1e-6, args.temperature_increment_on_fallback).round(6).tolist())
    else:
        temperature = args.temperature
    return dict(task=args.task, language=args.language, temperature=temperature, best_of=args.best_of, beam_size=args.beam_size,
                patience=args.patience, length_penalty=args.length_penalty, suppress_tokens=args.suppress_tokens,
                initial_prompt=args.initial_prompt, condition_on_previous_text=args.condition_on_previous_text,
                compression_ratio_threshold=args.compression_ratio_threshold, logprob_threshold=args.logprob_threshold,
                no_speech_threshold=args.no_speech_threshold, without_timestamps=args.without_timestamps)


def load(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if str(args.device).startswith("cuda") else "float32"))
    model = dw.load_model(args.model, device=args.device, dtype=dtype)
    if args.compile:
        model.decoder.hidden = torch.compile(model.decoder.hidden, dynamic=True)
    else:
        dw.use_half_precision_decoding(model)  # x86 CPUs, official weights: half the bytes a decoding step reads
    return model


def main(argv=None):
    args = parse_args(argv)
    options = decode_options(args)
    formats = list(WRITERS) if args.output_format == "all" else [args.output_format or "txt"] if args.output_format or args.output_dir else []
    out_dir = Path(args.output_dir or ".")
    try:
        if formats and not args.eval:  # each file's outputs are named by its stem: two stems alike would overwrite
            first = {}
            for path in args.audio:
                other = first.setdefault(Path(path).stem, path)
                if Path(other).resolve() != Path(path).resolve():
                    raise ValueError(f"{other} and {path} would both be written as {Path(path).stem}.{formats[0]} in {out_dir}: "
                                     "transcribe them in separate runs with different --output_dir")
        dw.usable_device(args.device)
        if args.limit < 0:
            raise ValueError(f"--limit must not be negative, not {args.limit}")
        if args.audio and not args.eval and not any(Path(path).is_file() for path in args.audio):  # before a model download
            raise FileNotFoundError(f"audio file not found: {args.audio[0]}" + (f" (nor any of the other {len(args.audio) - 1})" if len(args.audio) > 1 else ""))
        model = load(args)
        if args.language is not None:
            tokenizer = dw.get_tokenizer(model)
            if tokenizer.to_language_code(args.language) != "en" and not tokenizer.multilingual:  # as openai-whisper warns
                print(f"warning: {args.model} is an English-only model: --language {args.language} is ignored, English is "
                      "transcribed", file=sys.stderr)
        if args.eval:
            evaluate(model, args, options)
            return 0
        progress = False if sys.stderr.isatty() and not args.verbose else None
        results = dw.transcribe_many(model, args.audio, batch_size=args.batch_size, verbose=True if args.verbose else progress, **options)
    except (OSError, ValueError, ConnectionError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if formats:
        out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for i, result in results:
        path = args.audio[i]
        if isinstance(result, Exception):
            failed += 1
            print(f"error: {path}: {result}", file=sys.stderr)
            continue
        print(result["text"].strip() if len(args.audio) == 1 else f"{path}: {result['text'].strip()}", flush=True)
        for fmt in formats:
            write_atomic(out_dir / f"{Path(path).stem}.{fmt}", WRITERS[fmt](result))
    if failed:
        print(f"{failed} of {len(args.audio)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
