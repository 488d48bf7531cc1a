"""
sample.py: transcribe audio files with dualwhisper, or measure word error rates on a data set.

  python sample.py audio.wav                                  # text on stdout
  python sample.py talk.mp3 --model ../shared/models/whisper-tiny.en --beam_size 5
  python sample.py clips/*.wav --batch_size 16 --output_format srt --output_dir out/
  python sample.py lecture.mp3 --chunked --batch_size 16      # a long file cut at silences, its chunks in batches
  python sample.py talk.mp3 --word_timestamps True -f srt --max_line_width 42 --max_line_count 2
  python sample.py --eval data/az --split val --snr 10 5 0 --noise babble
  python sample.py --eval manifest.jsonl                      # {"path": ..., "text": ...} per line
  python sample.py --plot attention.png clip.wav --model out  # log-mel, both branches' attention, the gate

Transcription follows openai-whisper's `transcribe` (same options, same text and timestamps on the
same weights); the work is done by `transcribe_many` in dualwhisper.py, which decodes the current
30-second windows of up to --batch_size files together. --chunked cuts each file at silences into
chunks of at most 30 s and decodes those --batch_size at a time instead, as faster-whisper's
batched pipeline does.
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


def _cues(result, decimal_marker, hours, max_line_width=None, max_line_count=None, highlight_words=False, max_words_per_line=None, **_):
    """(start, end, text) of each subtitle: one per segment; with word timestamps, the words laid out
    as openai-whisper's writers lay them out (lines of at most max_line_width characters, cues of
    at most max_line_count lines, each word underlined in turn with highlight_words). Times show
    hours always (SRT) or from the first hour on (`hours` False: VTT)."""
    stamp = lambda t: dw.format_timestamp(t, always_include_hours=hours, decimal_marker=decimal_marker)
    segments = result["segments"]
    if not segments or "words" not in segments[0]:
        for s in segments:
            if s["text"].strip():
                yield stamp(s["start"]), stamp(s["end"]), s["text"].strip().replace("-->", "->")
        return
    for cue in _word_cues(segments, max_line_width, max_line_count, max_words_per_line):
        start, end = stamp(cue[0]["start"]), stamp(cue[-1]["end"])
        words = [w["word"] for w in cue]
        if not highlight_words:
            yield start, end, "".join(words)
            continue
        last = start
        for i, w in enumerate(cue):
            a, b = stamp(w["start"]), stamp(w["end"])
            if a != last:  # a gap between words: the cue without underline
                yield last, a, "".join(words)
            yield a, b, "".join(_underline(x) if j == i else x for j, x in enumerate(words))
            last = b


def _underline(word):
    text = word.lstrip()
    return word[:len(word) - len(text)] + f"<u>{text}</u>"


def _word_cues(segments, max_line_width, max_line_count, max_words_per_line):
    """Lists of words (copies, a line break written as a leading newline), one per subtitle. Unless
    both max_line_width and max_line_count are given, each segment (or each max_words_per_line
    words of it) starts a subtitle; with both, subtitles break at full cues and at pauses over 3 s."""
    keep_segments = max_line_count is None or max_line_width is None
    width, per_line = max_line_width or 1000, max_words_per_line or 1000
    cue, line_len, lines = [], 0, 1
    last = next((w["start"] for s in segments for w in s["words"]), segments[0]["start"]) or 0.0
    for s in segments:
        for first in range(0, len(s["words"]), per_line):
            for k, w in enumerate(s["words"][first:first + per_line]):
                w = dict(w)
                pause = not keep_segments and w["start"] - last > 3.0
                new_group = k == 0 and len(cue) > 0 and keep_segments
                if line_len > 0 and line_len + len(w["word"]) <= width and not pause and not new_group:
                    line_len += len(w["word"])  # the same line
                else:
                    w["word"] = w["word"].strip()
                    if (cue and max_line_count is not None and (pause or lines >= max_line_count)) or new_group:
                        yield cue  # a new subtitle
                        cue, lines = [], 1
                    elif line_len > 0:
                        lines += 1  # a new line
                        w["word"] = "\n" + w["word"]
                    line_len = len(w["word"].strip())
                cue.append(w)
                last = w["start"]
    if cue:
        yield cue


def to_txt(result, **_):
    return "".join(s["text"].strip() + "\n" for s in result["segments"] if s["text"].strip())


def to_srt(result, **options):
    return "".join(f"{i}\n{a} --> {b}\n{text}\n\n" for i, (a, b, text) in enumerate(_cues(result, ",", True, **options), 1))


def to_vtt(result, **options):
    return "WEBVTT\n\n" + "".join(f"{a} --> {b}\n{text}\n\n" for a, b, text in _cues(result, ".", False, **options))


def to_tsv(result, **_):
    """Start and end in whole milliseconds, then the text: no decimal marker to get wrong."""
    rows = [f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{s['text'].strip().replace(chr(9), ' ')}\n"
            for s in result["segments"] if s["text"].strip()]
    return "start\tend\ttext\n" + "".join(rows)


def to_json(result, **_):
    keys = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob", "gate", "words")
    segments = [json.dumps({k: s[k] for k in keys if k in s}, ensure_ascii=False) for s in result["segments"]]
    head = json.dumps({"text": result["text"], "language": result["language"]}, ensure_ascii=False)[:-1]
    return head + ', "segments": [' + "".join(f"\n  {s}," for s in segments).rstrip(",") + "\n]}\n"


WRITERS = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv, "json": to_json}


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


def transcribe_pool(model, pool, mixer, languages, batch_size, options, what="the set", lead=0):
    """The text of every clip of `pool` (a _Clips) with the noise of `mixer` (None: clean), a
    clip never mixed with itself, after `lead` samples of silence; decoded as transcribe_many
    decodes files."""
    silence = np.zeros(lead, dtype=np.float32)
    audios = (np.concatenate([silence, pool[i] if mixer is None else
                              mixer(torch.from_numpy(pool[i])[None], [len(pool[i])], [i], exclude=[i])[0].numpy()])
              for i in range(len(pool)))
    hyps = [None] * len(pool)
    progress = False if sys.stderr.isatty() else None  # a progress bar on a terminal
    for i, result in dw.transcribe_many(model, audios, batch_size=batch_size, languages=languages, verbose=progress, **options):
        if isinstance(result, Exception):
            raise ValueError(f"clip {i} of {what}: {result}")
        hyps[i] = result["text"]
    return hyps


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
        hyps = transcribe_pool(model, pool, mixer, languages, args.batch_size, options, what=args.eval)
        counts = dw.error_counts(refs, hyps, languages or [None if english else "other"] * len(refs))
        wer, cer = dw.error_rates(counts)
        print(f"{name:<24} {counts['clips']:>6} {100 * wer:>7.2f}% {100 * cer:>7.2f}% {time.time() - t0:>8.1f}", flush=True)


# -----------------------------------------------------------------------------
# what the branches look at


@torch.no_grad()
def plot_attention(model, path, out, layer=None, language=None):
    """Write a PNG for the first 30 seconds of `path`: the log-mel; per output token (greedy, as
    decoded by this model), the primary and the secondary cross-attention over time, the mean over
    heads of decoder layer `layer` (None: the mean over all layers); and the gate per token. A
    plain model has no secondary branch and no gate: its panels say so. Returns the tokens."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    n_layer = model.dims.n_text_layer
    if layer is not None and not -n_layer <= layer < n_layer:
        raise ValueError(f"--plot_layer {layer}: the model has decoder layers 0 to {n_layer - 1}")
    audio = dw.load_audio(path)[: dw.N_SAMPLES]
    param = next(model.parameters())
    mel = dw.log_mel_spectrogram(torch.from_numpy(audio), model.dims.n_mels, padding=dw.N_SAMPLES)[:, : dw.N_FRAMES][None]
    mel = mel.to(param.device, param.dtype)
    tokenizer = dw.get_tokenizer(model)
    if tokenizer.multilingual and language is None:
        language = dw.detect_language(model, mel, tokenizer)[0][0]
    prompt = tokenizer.sot_sequence(language=language) + [tokenizer.no_timestamps]
    text = dw.greedy_decode(model, mel, tokenizer, prompt=prompt, max_tokens=120)[0]
    tokens = torch.tensor([prompt + text + [tokenizer.eot]], device=param.device)
    _, details = model.analyse(mel, tokens)
    rows = slice(len(prompt) - 1, tokens.shape[1] - 1)  # the positions that predict the text and <|endoftext|>
    labels = [tokenizer.decode([t]) if t != tokenizer.eot else "<eot>" for t in tokens[0, len(prompt):].tolist()]
    chosen = details if layer is None else [details[layer]]
    frames = max(1, -(-len(audio) // (2 * dw.HOP_LENGTH)))  # encoder positions that hold the audio (20 ms each)

    def attention(key):  # (tokens, frames): the mean over heads and the chosen layers
        if chosen[0][key] is None:
            return None
        return torch.stack([d[key][0, :, rows, :frames].float().mean(0) for d in chosen]).mean(0).cpu().numpy()

    primary, secondary = attention("cross_attn"), attention("cross_attn2")
    gate = None if chosen[0]["gate"] is None else torch.stack([d["gate"][0, rows].float() for d in chosen]).mean(0).cpu().numpy()
    seconds = frames * 2 * dw.HOP_LENGTH / dw.SAMPLE_RATE
    height = 0.18 * len(labels) + 1
    fig, axes = plt.subplots(4, 1, figsize=(10, 2 + 3 * height), gridspec_kw={"height_ratios": [1.2, height, height, height]})
    axes[0].imshow(mel[0, :, : 2 * frames].float().cpu().numpy(), aspect="auto", origin="lower", extent=(0, seconds, 0, mel.shape[1]))
    axes[0].set_title(f"{Path(path).name}: log-mel; {'dual' if model.dims.dual else 'plain'} model, "
                      f"{'mean over decoder layers' if layer is None else f'decoder layer {layer}'}, mean over heads")
    axes[0].set_ylabel("mel bin")
    for ax, weights, name in ((axes[1], primary, "primary cross-attention (cross_attn)"), (axes[2], secondary, "secondary cross-attention (cross_attn2)")):
        if weights is None:
            ax.text(0.5, 0.5, "plain model: no secondary branch", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([]), ax.set_yticks([])
        else:
            ax.imshow(weights, aspect="auto", cmap="magma", extent=(0, seconds, len(labels) - 0.5, -0.5), interpolation="nearest")
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(name)
    for ax in axes[:3]:
        ax.set_xlim(0, seconds)
    axes[2].set_xlabel("audio time (s)")
    if gate is None:
        axes[3].text(0.5, 0.5, "plain model: no gate", ha="center", va="center", transform=axes[3].transAxes)
        axes[3].set_xticks([]), axes[3].set_yticks([])
    else:
        axes[3].barh(range(len(labels)), gate, color=["C3" if g < 0 else "C0" for g in gate])
        axes[3].set_yticks(range(len(labels)), labels, fontsize=7)
        axes[3].invert_yaxis()
        axes[3].axvline(0, color="k", lw=0.5)
        axes[3].set_xlabel("gate g per token (0: primary only; the second branch's share of the cross-attention output)")
    axes[3].set_title("gate")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return text


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
    p.add_argument("--compile", action="store_true", help="decode with fixed-shape steps compiled by torch.compile, on a GPU "
                                                                 "replayed as CUDA graphs (on an H200: faster for batches of files and beam search, slower "
                                                                 "for one file greedy and with --chunked; no faster on a CPU)")
    p.add_argument("--batch_size", type=int, default=8, help="windows decoded together: of different files, or with --chunked "
                                                            "of one file's chunks")
    p.add_argument("--chunked", action="store_true", help="cut each file at silences into chunks of at most 30 s, decoded "
                                                         "independently --batch_size at a time: several times faster on long "
                                                         "files (no window is conditioned on another chunk's text)")
    g = p.add_argument_group("output")
    g.add_argument("--output_format", "-f", choices=list(WRITERS) + ["all"], default=None,
                   help="write files of this format (default: text on stdout only)")
    g.add_argument("--output_dir", "-o", default=None, help="folder for the files (default: the current one)")
    g.add_argument("--verbose", type=_bool, nargs="?", const=True, default=None,
                   help="print each segment with its times as it is decoded (default: on a terminal); False: a progress bar")
    g = p.add_argument_group("word timestamps (as openai-whisper)")
    g.add_argument("--word_timestamps", type=_bool, default=False, help="find each word's start and end (json, srt, vtt)")
    g.add_argument("--prepend_punctuations", default=dw.PREPEND_PUNCTUATIONS, help="punctuation merged into the word after it")
    g.add_argument("--append_punctuations", default=dw.APPEND_PUNCTUATIONS, help="punctuation merged into the word before it")
    g.add_argument("--highlight_words", type=_bool, default=False, help="srt, vtt: underline each word as it is spoken")
    g.add_argument("--max_line_width", type=_none_or(int), default=None, help="srt, vtt: the most characters in a line")
    g.add_argument("--max_line_count", type=_none_or(int), default=None, help="srt, vtt: the most lines in a subtitle (with --max_line_width)")
    g.add_argument("--max_words_per_line", type=_none_or(int), default=None, help="srt, vtt: the most words in a line (without --max_line_width)")
    g.add_argument("--hallucination_silence_threshold", type=_none_or(float), default=None,
                   help="skip silences longer than this (seconds) around segments that look like hallucinations")
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
    g.add_argument("--clip_timestamps", default="0", help="start,end,start,end,... (seconds): the parts to transcribe; a last start runs to the end")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default=None, metavar="DATA", help="a prepare.py folder or a manifest (JSON list or lines, CSV or TSV with path,text)")
    g.add_argument("--split", default="val", help="split of a prepared folder")
    g.add_argument("--limit", type=int, default=0, help="evaluate the first N clips only")
    g.add_argument("--snr", type=float, nargs="*", default=[], help="also evaluate with noise at these SNRs (dB)")
    g.add_argument("--noise", default="white", help=f"noise of --snr: {', '.join(k for k in dw.NOISE_KINDS if k != 'bank')}, or a folder of noise recordings")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise")
    g = p.add_argument_group("what the branches look at (needs matplotlib)")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="plot the log-mel of the one audio file given, both branches' "
                                                                   "cross-attention per output token and the gate per token")
    g.add_argument("--plot_layer", type=int, default=None, help="the decoder layer to plot (default: the mean over all layers)")
    args = p.parse_args(argv)
    if not args.audio and not args.eval:
        p.error("give audio files to transcribe, or --eval DATA")
    if args.plot and (len(args.audio) != 1 or args.eval):
        p.error("--plot takes exactly one audio file (and no --eval)")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    if not args.word_timestamps:
        for flag in ("highlight_words", "max_line_width", "max_line_count", "max_words_per_line", "hallucination_silence_threshold"):
            if getattr(args, flag):
                p.error(f"--{flag} needs --word_timestamps True")
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
                no_speech_threshold=args.no_speech_threshold, without_timestamps=args.without_timestamps,
                clip_timestamps=args.clip_timestamps, word_timestamps=args.word_timestamps,
                prepend_punctuations=args.prepend_punctuations, append_punctuations=args.append_punctuations,
                hallucination_silence_threshold=args.hallucination_silence_threshold)


def writer_options(args):
    return dict(max_line_width=args.max_line_width, max_line_count=args.max_line_count, highlight_words=args.highlight_words,
                max_words_per_line=args.max_words_per_line)


def load(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if str(args.device).startswith("cuda") else "float32"))
    model = dw.load_model(args.model, device=args.device, dtype=dtype)
    model.requires_grad_(False)  # else the encoder records every window's activations for a backward pass that never comes
    if args.compile:
        dw.use_static_decoding(model)  # fixed-shape decoding steps, compiled; on a GPU replayed as CUDA graphs
    elif not args.eval:  # (--eval decodes as train.py's evaluation does, with the float32 products)
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
        if args.plot:
            text = plot_attention(model, args.audio[0], args.plot, args.plot_layer, args.language)
            print(f"{dw.get_tokenizer(model).decode(text).strip()}\nwrote {args.plot}")
            return 0
        if args.max_line_count and not args.max_line_width:
            print("warning: --max_line_count has no effect without --max_line_width", file=sys.stderr)
        if args.max_words_per_line and args.max_line_width:
            print("warning: --max_words_per_line has no effect with --max_line_width", file=sys.stderr)
        verbose = sys.stdout.isatty() if args.verbose is None else args.verbose  # segments as they come, on a terminal
        progress = False if sys.stderr.isatty() else None
        results = dw.transcribe_many(model, args.audio, batch_size=args.batch_size, chunked=args.chunked, verbose=True if verbose else progress, **options)
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
        if not verbose:  # else its segments were printed
            print(result["text"].strip() if len(args.audio) == 1 else f"{path}: {result['text'].strip()}", flush=True)
        for fmt in formats:
            write_atomic(out_dir / f"{Path(path).stem}.{fmt}", WRITERS[fmt](result, **writer_options(args)))
    if failed:
        print(f"{failed} of {len(args.audio)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
