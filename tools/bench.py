"""
tools/bench.py: timings against baselines measured in the same run, printed as ratios.

  python tools/bench.py transcribe   sample.py's transcription vs openai-whisper (and faster-whisper /
                                     transformers where installed)
  python tools/bench.py long         one long recording: sequential against chunked batches (transcribe(batch_size=N)),
                                     against openai-whisper (and transformers' pipeline, Silero VAD where installed)
  python tools/bench.py train        training clips/s vs transformers' Whisper in the same loop, and packed
                                     windows (train.py --pack) vs padded clips
  python tools/bench.py prepare      hours of audio prepared per minute, and batch read speed
  python tools/bench.py mfu          whisper-small training on a GPU: model FLOPs utilisation, peak memory
  python tools/bench.py memory       whisper-small training: where the memory goes (any device)
  python tools/bench.py noise        training's noise mixing a clip at a time, and coloured noise's FFT lengths
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules


def parse_args(p, args):
    return p.parse_args(args)


def sync(device):
    """Wait for the work queued on `device` (a GPU runs it asynchronously), so that a timer read
    after it counts that work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def openai_model(path, device):
    """openai-whisper's model holding the same weights as our plain load of `path` (needs openai-whisper)."""
    import whisper

    import dualwhisper as dw

    plain = dw.load_model(path, device=device, dual=False)
    fields = whisper.model.ModelDimensions.__dataclass_fields__
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**{k: v for k, v in vars(plain.dims).items() if k in fields}))
    ref.load_state_dict(plain.state_dict())
    return ref.to(device).eval()


def bench_transcribe(args):
    """Seconds to transcribe the same audio with the same weights, greedy at temperature 0, float32:
    sample.py's transcription (dualwhisper.transcribe_many) against openai-whisper, and against
    transformers and faster-whisper where they are installed. Each is run in turn, --repeat
    times, in one process, so that all see the same machine; the best and the median times are
    printed with the ratio to openai-whisper. Two cases: one file (jfk.flac), and --files short
    clips (pieces of jfk.flac at other speeds) that openai-whisper transcribes one at a time and
    we decode --batch_size windows at a time."""
    import os
    import statistics
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    import torch

    import dualwhisper as dw

    shared = Path(os.environ.get("DUALWHISPER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    p = argparse.ArgumentParser(prog="tools/bench.py transcribe", description=bench_transcribe.__doc__)
    p.add_argument("--model", default=str(shared / "models" / "whisper-tiny.en"), help="a hub-layout checkpoint folder")
    p.add_argument("--audio", default=str(shared / "audio" / "jfk.flac"), help="the one file, and the source of the short clips")
    p.add_argument("--files", type=int, default=40, help="number of short clips (0: the one file only)")
    p.add_argument("--batch_size", type=int, default=16, help="our windows decoded together")
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each (after one warm-up run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    p.add_argument("--beam_size", type=int, default=None, help="beam search instead of greedy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_transformers", action="store_true", help="leave transformers out even where it is installed")
    a = parse_args(p, args)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    ours = dw.load_model(a.model, device=device)
    audio = dw.load_audio(a.audio)
    rng = np.random.default_rng(0)
    clips = []
    for _ in range(a.files):
        start = rng.uniform(0, len(audio) / dw.SAMPLE_RATE - 3)
        piece = audio[int(start * dw.SAMPLE_RATE): int((start + rng.uniform(3, 11)) * dw.SAMPLE_RATE)]
        clips.append(dw.resample(piece, dw.SAMPLE_RATE, int(rng.choice([14400, 15200, 16000, 17200, 17600]))))  # other speeds
    options = dict(temperature=0.0, beam_size=a.beam_size)

    runners = {}  # name -> (one file, many files)
    fast = dw.load_model(a.model, device=device)
    if device.type == "cpu" and dw.use_half_precision_decoding(fast):  # as sample.py does on a CPU
        runners["ours (sample.py)"] = (lambda x: dw.transcribe(fast, x, **options)["text"],
                                       lambda xs: [r["text"] for _, r in sorted(dw.transcribe_many(fast, xs, batch_size=a.batch_size, **options))])
    name = "ours, float32 products" if runners else "ours"
    runners[name] = (lambda x: dw.transcribe(ours, x, **options)["text"],
                     lambda xs: [r["text"] for _, r in sorted(dw.transcribe_many(ours, xs, batch_size=a.batch_size, **options))])
    runners["ours, one file at a time"] = (None, lambda xs: [dw.transcribe(fast, x, **options)["text"] for x in xs])
    if device.type == "cuda":  # sample.py --compile: fixed-shape steps replayed as CUDA graphs
        graphs = dw.use_static_decoding(dw.load_model(a.model, device=device))
        runners["ours, CUDA graphs (--compile)"] = (lambda x: dw.transcribe(graphs, x, **options)["text"],
                                                    lambda xs: [r["text"] for _, r in sorted(dw.transcribe_many(graphs, xs, batch_size=a.batch_size, **options))])
    try:
        import whisper

        ref = openai_model(a.model, device)
        one = lambda x: whisper.transcribe(ref, x, fp16=False, **options)["text"]
        runners["openai-whisper"] = (one, lambda xs: [one(x) for x in xs])
    except ImportError:
        print("openai-whisper is not installed: pip install --no-deps openai-whisper (the ratios need it)")
    try:
        if a.no_transformers:
            raise ImportError
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        processor = WhisperProcessor.from_pretrained(a.model)
        hf = WhisperForConditionalGeneration.from_pretrained(a.model, torch_dtype=torch.float32).to(device).eval()

        def hf_run(xs):
            out = []
            for i in range(0, len(xs), a.batch_size):
                feats = processor(xs[i:i + a.batch_size], sampling_rate=dw.SAMPLE_RATE, return_tensors="pt").input_features
                with torch.no_grad():
                    ids = hf.generate(feats.to(device), num_beams=a.beam_size or 1, do_sample=False, return_timestamps=True)
                out += processor.batch_decode(ids, skip_special_tokens=True)
            return out

        runners[f"transformers, batch {a.batch_size}"] = (lambda x: hf_run([x])[0], hf_run)
    except ImportError:
        pass
    try:
        import ctranslate2
        from faster_whisper import WhisperModel

        ct2_dir = tempfile.mkdtemp(prefix="ct2-")
        ctranslate2.converters.TransformersConverter(a.model).convert(ct2_dir, quantization="float32", force=True)
        fw = WhisperModel(ct2_dir, device="cpu" if device.type == "cpu" else "cuda", compute_type="float32",
                          cpu_threads=a.threads or torch.get_num_threads())
        fw_one = lambda x: "".join(s.text for s in fw.transcribe(x, beam_size=a.beam_size or 1, temperature=0.0)[0])
        runners["faster-whisper"] = (fw_one, lambda xs: [fw_one(x) for x in xs])
    except ImportError:
        pass

    print(f"transcribe: {Path(a.model).name}, float32 on {device}, {torch.get_num_threads()} threads, "
          f"{'beam %d' % a.beam_size if a.beam_size else 'greedy'}, temperature 0; best and median of {a.repeat}")
    cases = [(f"one file ({Path(a.audio).name}, {len(audio) / dw.SAMPLE_RATE:.1f} s)", 0, audio),
             (f"{a.files} short files ({sum(map(len, clips)) / dw.SAMPLE_RATE:.0f} s in all)", 1, clips)][:2 if a.files else 1]
    for title, which, x in cases:
        print(title)
        fns = {name: f[which] for name, f in runners.items() if f[which] is not None}
        if which == 0:
            for fn in fns.values():
                fn(x)  # warm-up (the many-files case comes after this one)
        times, texts = {name: [] for name in fns}, {}
        for _ in range(a.repeat):  # in turn, so that a busy moment of the machine hits them all alike
            for name, fn in fns.items():
                t0 = time.perf_counter()
                texts[name] = fn(x)
                times[name].append(time.perf_counter() - t0)
        base = min(times["openai-whisper"]) if "openai-whisper" in times else None
        for name, t in times.items():
            ratio = f"{base / min(t):5.2f}x" if base else ""
            same = "" if base is None or name.startswith(("transformers", "faster")) else (
                "same text" if texts[name] == texts["openai-whisper"] else "TEXT DIFFERS")
            print(f"  {name:<32} {min(t):7.3f} s  {statistics.median(t):7.3f} s  {ratio}  {same}", flush=True)


def long_recording(audio, seconds, seed=0):
    """About `seconds` of jfk.flac's four phrases in a random order, each at one of five speeds,
    between pauses of 0.2 to 3 s: a long recording of real speech whose words are known.
    Returns the samples and the text."""
    import numpy as np

    import dualwhisper as dw

    sr = dw.SAMPLE_RATE
    phrases = [((0.0, 2.6), "and so my fellow americans"), ((2.6, 4.7), "ask not"), ((4.7, 7.9), "what your country can do for you"),
               ((7.9, 11.0), "ask what you can do for your country")]
    rng = np.random.default_rng(seed)
    pieces, words, total = [], [], 0
    while total < seconds * sr:
        (a, b), text = phrases[rng.integers(len(phrases))]
        piece = dw.resample(audio[int(a * sr):int(b * sr)], sr, int(rng.choice([14400, 15200, 16000, 17200, 17600])))
        pieces += [piece, np.zeros(int(rng.uniform(0.2, 3.0) * sr), np.float32)]
        words.append(text)
        total += len(pieces[-1]) + len(piece)
    return np.concatenate(pieces).astype(np.float32), " ".join(words)


def bench_long(args):
    """One long recording (--minutes of real speech: jfk.flac's phrases rearranged at other speeds
    between pauses, with background noise at --snr) transcribed by openai-whisper (sequential),
    by us sequentially (batch_size=1, openai-whisper's algorithm) and in batches of silence-cut
    chunks (transcribe(batch_size=N), sample.py --chunked), by the same chunking on Silero VAD's
    speech timestamps where the silero-vad package is importable, and by transformers' pipeline
    (chunk_length_s=30, batch_size=N) where installed. Greedy with openai-whisper's temperature
    fallback as users decode (--no_fallback: temperature 0 alone; transformers' pipeline has none),
    float32, the same weights, the same seed before each run; each run in turn --repeat times.
    Prints seconds, speed against openai-whisper, and the WER against the words spoken and against
    our sequential transcript."""
    import os
    import time

    import jiwer
    import torch

    import dualwhisper as dw

    shared = Path(os.environ.get("DUALWHISPER_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    p = argparse.ArgumentParser(prog="tools/bench.py long", description=bench_long.__doc__)
    p.add_argument("--model", default=str(shared / "models" / "whisper-tiny.en"))
    p.add_argument("--audio", default=str(shared / "audio" / "jfk.flac"))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--snr", type=lambda s: None if s == "none" else float(s), default=30.0,
                   help="dB of speech over pink background noise (none: clean, digital silence)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_fallback", action="store_true", help="temperature 0 alone: no retries of a failed window")
    a = p.parse_args(args)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    audio, truth = long_recording(dw.load_audio(a.audio), a.minutes * 60)
    if a.snr is not None:
        noise = dw.coloured_noise((1, len(audio)), "pink", torch.Generator().manual_seed(1))
        audio = dw.mix_at_snr(torch.from_numpy(audio)[None], noise, a.snr)[0].numpy()
    model = dw.load_model(a.model, device=device)
    if device.type == "cpu":
        dw.use_half_precision_decoding(model)  # as sample.py does
    options = dict(temperature=0.0) if a.no_fallback else {}
    runners = {}
    try:
        import whisper

        ref = openai_model(a.model, device)
        runners["openai-whisper, sequential"] = lambda: whisper.transcribe(ref, audio, fp16=False, **options)["text"]
    except ImportError:
        print("openai-whisper is not installed: pip install --no-deps openai-whisper (the ratios need it)")
    runners["ours, sequential (batch_size=1)"] = lambda: dw.transcribe(model, audio, **options)["text"]
    runners[f"ours, chunked, batch {a.batch_size}"] = lambda: dw.transcribe(model, audio, batch_size=a.batch_size, **options)["text"]
    if device.type == "cuda":  # sample.py --compile: fixed-shape steps replayed as CUDA graphs
        graphs = dw.use_static_decoding(dw.load_model(a.model, device=device))
        dw.transcribe(graphs, audio[:60 * dw.SAMPLE_RATE], batch_size=a.batch_size, **options)  # captures outside the timing
        runners[f"ours, chunked, batch {a.batch_size}, CUDA graphs"] = lambda: dw.transcribe(graphs, audio, batch_size=a.batch_size, **options)["text"]
    try:
        from silero_vad import get_speech_timestamps, load_silero_vad

        vad = load_silero_vad()

        def silero_chunks():
            speech = get_speech_timestamps(torch.from_numpy(audio), vad, max_speech_duration_s=dw.CHUNK_LENGTH - 1, return_seconds=False)
            chunks = []
            for s in speech:
                if chunks and s["end"] - chunks[-1][0] <= dw.N_SAMPLES:
                    chunks[-1][1] = s["end"]
                else:
                    chunks.append([s["start"], s["end"]])
            pieces = [audio[x:y] for x, y in chunks]
            out = dict(dw.transcribe_many(model, pieces, batch_size=a.batch_size, **options))
            return "".join(out[i]["text"] for i in range(len(pieces)))

        runners[f"ours, chunked by Silero VAD, batch {a.batch_size}"] = silero_chunks
    except ImportError:
        pass
    try:
        from transformers import pipeline

        asr = pipeline("automatic-speech-recognition", model=a.model, device=device, torch_dtype=torch.float32)
        if asr.tokenizer.pad_token_id is None:  # its batching asks for one
            asr.tokenizer.pad_token_id = asr.model.config.eos_token_id
        runners[f"transformers pipeline, chunk_length_s=30, batch {a.batch_size}"] = lambda: asr(
            audio.copy(), chunk_length_s=30, batch_size=a.batch_size, generate_kwargs=dict(do_sample=False, num_beams=1))["text"]
    except ImportError:
        pass

    print(f"long: {Path(a.model).name}, float32 on {device}, {torch.get_num_threads()} threads, greedy"
          f"{'' if a.no_fallback else ' with temperature fallback'}; {len(audio) / dw.SAMPLE_RATE / 60:.1f} min of jfk.flac's "
          f"phrases, pink noise at {a.snr} dB; best of {a.repeat}")
    times, texts = {name: [] for name in runners}, {}
    for _ in range(a.repeat):
        for name, fn in runners.items():
            torch.manual_seed(0)  # the fallback's samples
            t0 = time.perf_counter()
            texts[name] = dw.normalize_text(fn())
            times[name].append(time.perf_counter() - t0)
    base = min(times["openai-whisper, sequential"]) if "openai-whisper, sequential" in times else None
    sequential = texts["ours, sequential (batch_size=1)"]
    print(f"  {'':<52} {'seconds':>8} {'speed':>7} {'WER':>6} {'vs ours sequential':>19}")
    for name, t in times.items():
        ratio = f"{base / min(t):6.2f}x" if base else ""
        print(f"  {name:<52} {min(t):8.2f} {ratio:>7} {100 * jiwer.wer(truth, texts[name]):5.1f}% "
              f"{100 * jiwer.wer(sequential, texts[name]):18.1f}%", flush=True)


def bench_train(args):
    """Training clips/s of train.py's loop on our model against transformers'
    WhisperForConditionalGeneration trained by the same loop (noise mixing, log-mel on the device,
    forward with each model's cross-entropy, backward, clipping, AdamW step) on the same batches, in the same
    dtype, with the same parts frozen, and against our model on packed windows (train.py --pack:
    batch_size windows per step, each holding several clips); all are timed step by step in turn
    in one process, so that all see the same machine load. On a GPU it also gives whisper-small's model FLOPs
    utilisation and peak memory in bfloat16 (the original project: about 32 samples/s on an A100,
    about 12% utilisation, about 12 GB at batch 16)."""
    import time
    from contextlib import nullcontext

    import numpy as np
    import torch

    import dualwhisper as dw
    import prepare
    import train

    p = argparse.ArgumentParser(prog="tools/bench.py train", description=bench_train.__doc__)
    p.add_argument("--model", default=train.DEFAULT_MODEL, help="weights both models start from (a hub-layout folder)")
    p.add_argument("--data", default="data/demo", help="a prepared folder (python prepare.py --demo)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed steps of each model (after one warm-up step each)")
    p.add_argument("--freeze", default="encoder", help="frozen parts, as train.py --freeze (encoder or none)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plain", action="store_true", help="our model without the second cross-attention (the same computation as theirs)")
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True, help="time transformers' model too")
    p.add_argument("--pack_args", default="", help="train.py --pack_* flags of the packed windows (default: train.py's), "
                                                   "e.g. '--pack_alone 0' to pack every clip")
    p.add_argument("--warm_all", action="store_true", help="step every batch once, untimed, before the timed steps: each "
                                                            "shape met first outside the timing (a GPU's kernel plans and caches)")
    p.add_argument("--mfu", action=argparse.BooleanOptionalAction, default=None,
                   help="whisper-small MFU and peak memory, random weights, batch 16 (default: on a GPU)")
    a = parse_args(p, args)
    device = torch.device(a.device)
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    ptdtype = getattr(torch, dtype)
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, dtype=ptdtype)
    torch.manual_seed(0)
    split = prepare.PreparedSplit(a.data, "train")
    bank = prepare.PreparedSplit(a.data, "noise") if (prepare.Path(a.data) / "noise.index.npy").exists() else None
    noise = train.parse_noise(train.DEFAULT_NOISE)
    if bank is None:
        noise.pop("bank")
    mixer = dw.NoiseMixer(noise, bank, split)
    frozen = train.parse_freeze(a.freeze)

    ours = dw.load_model(a.model, device=device, dual=not a.plain)
    label = "ours (plain)" if a.plain else "ours (dual)"
    tokenizer = dw.get_tokenizer(ours)
    packed = f"{label}, packed"
    models = {label: ours, packed: ours}
    loss_of = {label: lambda mel, x, y: ours(mel, x, y), packed: lambda mel, x, y: ours(mel, x, y)}  # each model's own training loss
    parts = [(ours, ours.encoder, ours.decoder)]
    if a.transformers:
        from transformers import WhisperForConditionalGeneration

        hf = WhisperForConditionalGeneration.from_pretrained(a.model, torch_dtype=torch.float32).to(device)
        models["transformers"] = hf
        loss_of["transformers"] = lambda mel, x, y: hf(input_features=mel, decoder_input_ids=x, labels=y).loss
        parts.append((hf, hf.model.encoder, hf.model.decoder))
    for model, encoder, decoder in parts:
        model.train()
        for part, module in (("encoder", encoder), ("decoder", decoder)):
            for name, q in module.named_parameters():
                q.requires_grad_(not (part in frozen and not dw.is_dual_parameter(name)))
    optimizers = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-5, fused=device.type in train.FUSED_ADAMW_DEVICES)
                  for k, m in models.items()}

    clips = np.arange(len(split))
    d = train.get_parser().parse_args(a.pack_args.split())  # train.py's packing defaults, or --pack_args
    windows = train.PackedStream.of_flags(split, clips, 0, d, tokenizer.no_timestamps, ours.dims.n_text_ctx)
    batches = []  # per step: {name: (noise keys, excluded clips, clips, batch)}
    for s in range(a.steps + 1):
        indices = [int(clips[(s * a.batch_size + b) % len(clips)]) for b in range(a.batch_size)]
        batch = train.get_batch(split, indices, tokenizer.no_timestamps, tokenizer.eot, ours.dims.n_text_ctx, device)
        ws = [windows[s * a.batch_size + b] for b in range(a.batch_size)]
        audio, spans, x, y, _ = train.window_batch(split, ws, tokenizer, ours.dims.n_text_ctx, device)
        batches.append({**{name: (indices, indices, len(indices), (*batch[:2], None, *batch[2:4])) for name in models if name != packed},
                        packed: ([w[0] for w in ws], [[c for c, _ in w[2]] for w in ws], sum(map(len, spans)), (audio, None, spans, x, y))})

    def step(name, keys, exclude, batch, mel_times=None):
        """One training step of train.py's loop; mel_times gets the seconds of its noise and log-mel."""
        audio, lengths, spans, x, y = batch
        t0 = time.perf_counter()
        mel = train.log_mel(audio, lengths, ours.dims.n_mels, mixer, keys=keys, exclude=exclude, spans=spans, pack_noise=d.pack_noise)
        if mel_times is not None:
            sync(device)
            mel_times.append(time.perf_counter() - t0)
        with autocast:
            loss = loss_of[name](mel, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in models[name].parameters() if q.requires_grad], 1.0)
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return loss.item()

    times, counts, mel_times = {k: [] for k in models}, {k: [] for k in models}, {k: [] for k in models}  # of each timed step
    if a.warm_all:
        for step_batches in batches[1:]:  # batch 0, the warm-up step below, goes first in the timed pass too
            for name in models:
                keys, exclude, _, batch = step_batches[name]
                step(name, keys, exclude, batch)
    for s, step_batches in enumerate(batches):
        for name in (models if s % 2 == 0 else reversed(list(models))):  # alternate which goes first
            keys, exclude, n_clips, batch = step_batches[name]
            sync(device)
            t0 = time.perf_counter()
            step(name, keys, exclude, batch, mel_times[name] if s > 0 else None)
            sync(device)
            if s > 0:
                times[name].append(time.perf_counter() - t0)
                counts[name].append(n_clips)
    print(f"training step of {a.model} on {a.data}, batch {a.batch_size} x 30 s (padded: a clip each; packed: "
          f"{sum(counts[packed]) / len(counts[packed]) / a.batch_size:.1f} clips each), {dtype} on {device}"
          f" ({torch.get_num_threads()} threads), frozen: {','.join(sorted(frozen)) or 'none'}, {a.steps} timed steps each"
          + (", every batch stepped once before" if a.warm_all else ""))
    # throughput over all timed steps, and at the best and the median step: this shared 2-core
    # machine's speed drifts by 10-20% from one minute to the next, which the best step (as
    # timeit advises) shows least
    rates = {k: np.array(counts[k]) / np.array(v) for k, v in times.items()}  # clips/s of each step
    overall = {k: sum(counts[k]) / sum(v) for k, v in times.items()}
    best, median = {k: float(r.max()) for k, r in rates.items()}, {k: float(np.median(r)) for k, r in rates.items()}
    for k in times:
        print(f"RESULT train {k:22s}: {overall[k]:.3f} clips/s over all steps, {best[k]:.3f} at the best step "
              f"({min(times[k]):.2f} s), {median[k]:.3f} at the median; noise and log-mel {100 * sum(mel_times[k]) / sum(times[k]):.0f}% "
              f"of the time ({1e3 * sum(mel_times[k]) / sum(counts[k]):.2f} ms a clip)")
    # each batch's steps ran back to back, so their ratio cancels the slow drift that moves the
    # totals; its median also discounts a step that a neighbour's burst hit
    for faster, slower, target in ((label, "transformers", "1.3x"), (packed, label, "4x on clips of about 3 s")):
        if slower in times:
            pairs = rates[faster] / rates[slower]
            print(f"RESULT {faster} / {slower}: {overall[faster] / overall[slower]:.2f}x over all steps, "
                  f"{best[faster] / best[slower]:.2f}x at the best step, {median[faster] / median[slower]:.2f}x at the median, "
                  f"{np.median(pairs):.2f}x the median of the {len(pairs)} batches' ratios (target: {target})")

    if a.mfu if a.mfu is not None else device.type == "cuda":
        bench_train_mfu(device)


GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}


def train_flops_per_sample(dims, n_tokens, dual=True):
    """Model FLOPs of one training example (forward and backward, 3x the forward's matmuls)."""
    d, S, T, V = dims.n_audio_state, dims.n_audio_ctx, n_tokens, dims.n_vocab
    enc = 2 * (dims.n_mels * d * 3 * 2 * S + d * d * 3 * S) + dims.n_audio_layer * (2 * 12 * d * d * S + 4 * S * S * d)
    branches = 2 if dual else 1
    dt = dims.n_text_state
    layer = 2 * 12 * dt * dt * T + 4 * T * T * dt + branches * (2 * 2 * dt * dt * (T + S) + 4 * T * S * dt) + dual * 2 * 3 * dt * T
    dec = dims.n_text_layer * layer + 2 * dt * V * T
    return 3 * (enc + dec)


def whisper_small_dims(dual=True):
    """The dimensions of multilingual whisper-small."""
    import dualwhisper as dw

    return dw.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12, n_vocab=51865,
                              n_text_ctx=448, n_text_state=768, n_text_head=12, n_text_layer=12, dual=dual)


def bench_train_mfu(device, batch_size=16, n_tokens=64, steps=5, dims=None, compile=None, profile=False, mode=None):
    """whisper-small (random weights, dual; or `dims`), all parts trained, as train.py runs it on a
    GPU (bfloat16 autocast, compiled; float32 and eager elsewhere): samples/s, model FLOPs
    utilisation and peak memory."""
    import time
    from contextlib import nullcontext

    import torch

    import dualwhisper as dw
    import train

    dims = dims or whisper_small_dims()
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()  # bfloat16 is ~100x slower on CPUs
    model = dw.Whisper(dims).to(device).train()
    compiled = torch.compile(model, mode=mode) if (cuda if compile is None else compile) else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type in train.FUSED_ADAMW_DEVICES)
    mel = torch.randn(batch_size, 80, 3000, device=device)
    x = torch.randint(0, 50000, (batch_size, n_tokens), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []

    def train_step():
        with autocast:
            loss = compiled(mel, x, x)  # the mean cross-entropy, as train.py's loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    for s in range(steps + 2):
        t0 = time.perf_counter()
        train_step()
        if s >= 2:  # compile and warm-up first
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    rate = batch_size / step
    flops = train_flops_per_sample(dims, n_tokens) * rate
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    what = f"{'whisper-small' if dims.n_audio_state == 768 else 'model'} dual, {'bf16' if cuda else 'fp32'}, batch {batch_size}, {mode or 'default'} compile"
    print(f"RESULT {what} x ({n_tokens} tokens), {name}: {rate:.1f} samples/s, {flops / 1e12:.3g} TFLOP/s"
          + (f" = {100 * flops / peak:.0f}% MFU (original: about 12% on an A100)" if peak else ""))
    if cuda:
        print(f"RESULT peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (original: about 12 GB at batch 16)")
    if profile:
        profile_steps(train_step, cuda)


def bench_memory(args):
    """Where whisper-small's training memory goes, as train.py trains it on a GPU (every part
    trained, bfloat16 autocast, AdamW): the weights, their gradients and AdamW's two moments,
    counted from the parameters; and the tensors one forward pass saves for the backward pass,
    counted by torch.autograd.graph.saved_tensors_hooks (each storage once) and put to the module
    that saved them: the encoder's parts, the decoder's self-attention, the first cross-attention
    branch, the second branch and its gate, the MLPs, the logits and loss. Runs on any device (a
    CPU takes about a minute at --batch_size 1). Forward passes of --batch_size and twice as many
    clips tell what grows with the batch from what a step saves once; the table is for --scale_to
    clips. Eager: torch.compile (train.py's default on a GPU) saves less, recomputing what is cheap."""
    import time
    from collections import defaultdict

    import torch

    import dualwhisper as dw

    p = argparse.ArgumentParser(prog="tools/bench.py memory", description=bench_memory.__doc__)
    p.add_argument("--batch_size", type=int, default=1, help="clips in the measured forward pass")
    p.add_argument("--scale_to", type=int, default=16, help="clips the table is given for (saved tensors grow with the batch)")
    p.add_argument("--tokens", type=int, default=64, help="decoder tokens per clip")
    p.add_argument("--plain", action="store_true", help="without the second cross-attention")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(args)
    device = torch.device(a.device)
    model = dw.Whisper(whisper_small_dims(dual=not a.plain)).to(device).train()

    def part(name):
        """The row of the table that a module's saved tensors go to."""
        side = name.split(".")[0]  # encoder or decoder
        if name.startswith("encoder.conv"):
            return "encoder: convolutions"
        if ".cross_attn2" in name or ".gate" in name:
            return "decoder: second branch"
        if ".cross_attn" in name:
            return "decoder: cross-attention (first branch)"
        if ".attn" in name:
            return f"{side}: self-attention"
        if ".mlp" in name:
            return f"{side}: MLP"
        if side == "encoder":
            return "encoder: residuals, norms"
        if name.startswith("decoder.blocks"):
            return "decoder: residuals, norms, the fusion of the branches"
        return "decoder: embeddings, final norm, logits, loss"

    def leave(module, inputs, output):  # returns None: the output unchanged
        stack.pop()

    stack = [""]
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    for name, module in model.named_modules():
        if name:
            module.register_forward_pre_hook(lambda m, x, name=name: stack.append(name))
            module.register_forward_hook(leave)

    def saved_by_part(batch_size):
        """Bytes saved for the backward pass by a forward pass of batch_size clips, by part."""
        saved, seen = defaultdict(int), set()

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                saved[part(stack[-1])] += storage.nbytes()
            return t

        mel = torch.randn(batch_size, 80, 3000, device=device)
        x = torch.randint(0, 50000, (batch_size, a.tokens), device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device.type, dtype=torch.bfloat16):
            model(mel, x, x)
        return saved

    # at b and 2b clips: what grows with the batch, and what a step saves once (the weights' bfloat16 copies)
    t0 = time.perf_counter()
    one, two = saved_by_part(a.batch_size), saved_by_part(2 * a.batch_size)
    seconds = time.perf_counter() - t0
    per_clip = {k: (two[k] - one[k]) / a.batch_size for k in two}
    once = sum(one[k] - per_clip[k] * a.batch_size for k in two)
    n_params = sum(q.numel() for q in model.parameters())
    n_dual = sum(q.numel() for name, q in model.named_parameters() if dw.is_dual_parameter(name))
    gib = 2 ** 30
    print(f"memory: whisper-small {'plain' if a.plain else 'dual'} training, bfloat16 autocast, eager, {a.tokens} tokens a "
          f"clip, {a.scale_to} clips ({n_params / 1e6:.0f}M parameters, {n_dual / 1e6:.1f}M of them the second branches and "
          f"gates); the saved tensors from forward passes of {a.batch_size} and {2 * a.batch_size} clips on {device} ({seconds:.0f} s)")
    rows = [("weights, float32", 4 * n_params), ("gradients, float32", 4 * n_params), ("AdamW moments, float32", 8 * n_params),
            ("saved: the weights' bfloat16 copies (autocast)", once)]
    rows += [(f"saved: {k}", v * a.scale_to) for k, v in sorted(per_clip.items(), key=lambda kv: -kv[1])]
    for name, n in rows:
        print(f"  {name:<66} {n / gib:6.2f} GiB")
    print(f"  {'in all':<66} {sum(n for _, n in rows) / gib:6.2f} GiB")


def profile_steps(step, cuda, n=3):
    """Where the time of `n` steps goes: device time by kind of kernel, and how much of the wall
    time the device was busy (the rest is launch overhead or host work)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    if not cuda:
        print("PROFILE: device time is profiled on CUDA only")
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        wall = (time.perf_counter() - t0) / n
    kinds = {"attention": ("flash", "fmha", "attention", "sdpa"), "matmul": ("gemm", "nvjet", "cutlass", "sm90_", "cublas"),
             "convolution": ("conv", "cudnn"), "optimizer": ("adam", "multi_tensor", "foreach"), "fused (triton)": ("triton",)}
    by_kind, rows = {}, []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0) if t is None else t
        if not t or str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":  # kernels, not the ops that launch them
            continue
        name = e.key.lower()
        kind = next((k for k, keys in kinds.items() if any(w in name for w in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0) + t / n / 1e3
        rows.append((t / n / 1e3, e.count // n, e.key[:90]))
    busy = sum(by_kind.values())
    print(f"PROFILE step {wall * 1e3:.1f} ms wall, device busy {busy:.1f} ms ({100 * busy / (wall * 1e3):.0f}%)")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"PROFILE   {kind:15s} {t:7.1f} ms")
    for t, count, name in sorted(rows, reverse=True)[:12]:
        print(f"PROFILE   {t:7.2f} ms {count:5d}x {name}")


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

    p = argparse.ArgumentParser(prog="tools/bench.py prepare", description=bench_prepare.__doc__)
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


def bench_noise(args):
    """Training's noise, a clip at a time as train.py draws it: NoiseMixer's time a clip for each
    kind over a prepared folder's first training clips, and pink and brown noise shaped over each
    clip's own length (the baseline: a new FFT plan for each length, and a corpus has clips of
    every length) against over the next power of two, as dualwhisper.coloured_noise shapes it."""
    import time

    import torch

    import dualwhisper as dw
    import prepare

    p = argparse.ArgumentParser(prog="tools/bench.py noise", description=bench_noise.__doc__)
    p.add_argument("--data", default="data/demo", help="a prepared folder (python prepare.py --demo)")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = parse_args(p, args)
    device = torch.device(a.device)

    def timed(f):
        sync(device)
        t0 = time.perf_counter()
        f()
        sync(device)
        return time.perf_counter() - t0

    split = prepare.PreparedSplit(a.data, "train")
    bank = prepare.PreparedSplit(a.data, "noise") if (Path(a.data) / "noise.index.npy").exists() else None
    n = min(a.clips, len(split))
    lengths = [int(split.lengths[i]) for i in range(n)]
    audio = torch.from_numpy(split.batch(range(n))[0]).to(device)
    print(f"{n} clips of {a.data} ({len(set(lengths))} lengths, {sum(lengths) / n / dw.SAMPLE_RATE:.1f} s on average) on {device}")
    torch.fft.rfft(torch.zeros(1000, device=device))  # the FFT library loads at its first call
    for kind in dw.NOISE_KINDS:
        if kind == "bank" and bank is None:
            continue
        mixer = dw.NoiseMixer({kind: 1.0}, bank, split)
        print(f"RESULT NoiseMixer {kind:6s}: {1e3 * timed(lambda: mixer(audio, lengths, range(n), range(n))) / n:.2f} ms a clip")

    def own_length(L, exponent):  # the baseline: noise of slope 1/f^exponent shaped over its own L samples
        f = torch.fft.rfftfreq(L, device=device)
        f[0] = f[1]
        return torch.fft.irfft(torch.fft.rfft(torch.randn(L, device=device)) / f.pow(exponent / 2), n=L)

    for colour, exponent in (("pink", 1), ("brown", 2)):
        own = timed(lambda: [own_length(L + exponent, exponent) for L in lengths]) / n  # lengths no FFT has planned yet
        two = timed(lambda: [dw.coloured_noise((L,), colour, device=device) for L in lengths]) / n
        print(f"RESULT {colour} shaped over each clip's length {1e3 * own:.2f} ms a clip, over the next power of two "
              f"{1e3 * two:.2f}: {own / two:.1f}x")


def bench_mfu(args):
    """whisper-small (random weights) trained as train.py trains it on a GPU: bfloat16 autocast,
    torch.compile, fused AdamW, every part trained. Prints samples/s, model FLOPs utilisation
    against the GPU's dense bfloat16 peak, and peak memory, for each --batch_size."""
    import torch

    p = argparse.ArgumentParser(prog="tools/bench.py mfu", description=bench_mfu.__doc__)
    p.add_argument("--batch_size", type=int, nargs="+", default=[16], help="one run per batch size")
    p.add_argument("--tokens", type=int, default=64, help="decoder tokens per clip")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after two warm-up steps)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on a GPU")
    p.add_argument("--mode", default=None, help="torch.compile's mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="then profile 3 steps: device time by kind of kernel")
    a = p.parse_args(args)
    for batch_size in a.batch_size:
        bench_train_mfu(torch.device(a.device), batch_size, a.tokens, a.steps, compile=a.compile, profile=a.profile, mode=a.mode)


BENCHMARKS = {"transcribe": bench_transcribe, "long": bench_long, "train": bench_train, "prepare": bench_prepare, "mfu": bench_mfu,
              "memory": bench_memory, "noise": bench_noise}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:  # bench.py NAME --help is NAME's help
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("what", choices=list(BENCHMARKS))
        parser.parse_args()
    BENCHMARKS[sys.argv[1]](sys.argv[2:])
