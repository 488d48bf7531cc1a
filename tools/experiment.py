"""
tools/experiment.py: does dual attention make Whisper robust to noise? Fine-tune plain and dual
Whisper from the same checkpoint on the same data, score every arm on a held-out test split under
noise, and write the results folder.

  python tools/experiment.py --quick --threads 1 --jobs 2   # tiny.en, English corpus, sized for a 2-core CPU
  python tools/experiment.py --full                         # whisper-base, Azerbaijani corpus, a GPU
  python tools/experiment.py --quick --arms plain,dual,layer,plain_kl,dual_kl --out runs/ablations
  python tools/experiment.py --data data/az --init_from openai/whisper-small --language az --max_iters 5000 --batch_size 32

What it does, in order (each stage is skipped when its output exists, so the same command goes on
after an interruption):
  1. data: `prepare.py --corpus OUT/data` unless --data names a prepared folder (train, and test
     or val; noise_test is the bank of held-out noise recordings, else noise is used, not held out)
  2. training: for every seed, every arm runs `train.py` with the same data, steps, batch,
     schedule, seed and noise; its log records each step's clips and a checksum of its noisy
     log-mel, and the arms of a seed are checked to have seen exactly the same
  3. evaluation: the official checkpoint and every run's final weights transcribe the test clips
     (sample.py's decoding: temperature fallback, as users decode) clean and with each noise kind
     at each SNR, the same noisy audio for every model; babble and competing talkers come from
     the test split's own talkers, the bank from noise_test; with --offset S every test clip starts
     after S seconds of silence (an --out of its own: its scores are kept apart)
  4. OUT/results.json (every number, each clip's transcript and errors included), OUT/results.md
     (mean and spread over seeds; word errors by kind), OUT/wer_vs_snr.png (needs matplotlib)

Scores. A single repetition loop can make one clip's word errors exceed all the other clips'
together, so besides the corpus WER (all errors / all reference words) every table gives the
capped WER, in which a clip's errors count at most its reference words (a loop costs what a
missed clip costs), and results.json keeps each clip's errors.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dualwhisper as dw  # noqa: E402

SHARED = Path(os.environ.get("DUALWHISPER_SHARED", ROOT.parent / "shared"))

# arm name -> train.py flags on top of the common ones
PACK = ["--pack", "--batch_size", "1", "--pack_by", "language", "--pack_noise", "window", "--pack_no_timestamps", "0.5",
        "--pack_alone", "0"]
PACK1 = [*PACK, "--batch_size", "8", "--pack_clips", "1"]
# train.py's --pack defaults, but every clip packed (--pack_alone 0, from PACK)
PACK_DEFAULTS = [*PACK, "--pack_lead", "-1", "1", "--pack_noise", "span", "--pack_by", "speaker"]
PACK_TRAIN = [*PACK_DEFAULTS, "--pack_alone", "0.05"]  # train.py's --pack defaults, one clip in 20 alone
ARMS = {
    "plain": ["--plain"],
    "dual": [],
    "sigmoid": ["--gate", "sigmoid", "--branch2", "copy"],
    "channel": ["--gate", "channel"],
    "layer": ["--gate", "layer"],
    "copy": ["--branch2", "copy"],
    "dual_lr1": ["--dual_lr_mult", "1"],
    "plain_encoder": ["--plain", "--freeze", "none"],
    "dual_encoder": ["--freeze", "none"],
    "plain_kl": ["--plain", "--consistency", "1"],
    "dual_kl": ["--consistency", "1"],
    # packing (train.py --pack): one window a step (dual_pack2: 4, dual_pack1*: 8), as many steps as see the clips the
    # padded arms see (packed_iters). Every flag that makes an arm is spelled out, so that a change of train.py's
    # defaults leaves the arms as they were measured.
    "plain_pack": [*PACK, "--plain"],
    "dual_pack": PACK,  # windows of clips of one language, noise over the window, the first clip after a gap
    "dual_pack_clip": [*PACK, "--pack_noise", "clip"],  # a noise draw per clip, over it and the silence before it
    "dual_pack_span": [*PACK, "--pack_noise", "span"],  # a draw per clip over the clip alone, as padded training mixes it
    "dual_pack_text": [*PACK, "--pack_no_timestamps", "1"],  # every window without timestamps
    "dual_pack2": [*PACK, "--batch_size", "4", "--pack_clips", "2"],  # windows of at most 2 clips, 4 a step
    "dual_pack_lead0_span": [*PACK, "--pack_lead", "0", "0", "--pack_noise", "span"],
    # one speaker a window, half of the windows at 0 s, noise over each clip alone: train.py's defaults but --pack_alone 0
    "dual_pack_speaker_lead": PACK_DEFAULTS,
    # the defaults with twice the learning rate, or windows of at most 4 clips, 2 a step
    "dual_pack_lr2": [*PACK_DEFAULTS, "--learning_rate", "2e-4"],
    "dual_pack4": [*PACK_DEFAULTS, "--batch_size", "2", "--pack_clips", "4"],
    # the defaults with a share of the clips (5, 10, 25, 50 in 100) each alone in a window at 0 s, as a clip is evaluated;
    # dual_pack_alone5 is train.py's defaults
    "dual_pack_alone5": [*PACK_DEFAULTS, "--pack_alone", "0.05"],
    "dual_pack_alone10": [*PACK_DEFAULTS, "--pack_alone", "0.1"],
    "dual_pack_alone25": [*PACK_DEFAULTS, "--pack_alone", "0.25"],
    "dual_pack_alone50": [*PACK_DEFAULTS, "--pack_alone", "0.5"],
    "dual_pack_alone5_x6": PACK_TRAIN,  # and on 6 times the clips, as dual_x6
    "dual_pack_alone10_x6": [*PACK_DEFAULTS, "--pack_alone", "0.1"],
    # train.py's defaults (one clip in 20 alone), but 9 windows in 10 start at 0 s, as a transcribed clip starts
    "dual_pack_lead90_x6": [*PACK_TRAIN, "--pack_lead", "-9", "1"],
    # train.py's defaults, two windows a step: about 11 clips of 2 voices, nearer the padded arms' 8 clips of 8 voices
    "dual_pack_b2_x6": [*PACK_TRAIN, "--batch_size", "2"],
    # train.py's defaults at twice the padded arms' learning rate
    "dual_pack_lr2_x6": [*PACK_TRAIN, "--learning_rate", "2e-4"],
    # train.py's defaults, but windows of one language, several voices each, as a padded batch holds
    "dual_pack_language_x6": [*PACK_TRAIN, "--pack_by", "language"],
    # the defaults with the encoder trained too, as dual_encoder
    "dual_pack_encoder": [*PACK_DEFAULTS, "--freeze", "none"],
    # the defaults for about the padded arms' training time: 6 times their clips (CLIPS_SEEN)
    "dual_pack_x6": PACK_DEFAULTS,
    # padded training on as many clips as dual_pack_x6: the equal-clips comparison at 6 times the clips
    "dual_x6": [],
    "dual_x6_lr2": ["--learning_rate", "2e-4"],  # and at twice the learning rate, as dual_pack_lr2_x6
    # one clip a window, 8 a step: through the packed path, padded training (dual_pack1, the same losses as dual), then
    # one change each (silence before the clip, timestamped targets, noise over the window), then all three (dual_pack1ts)
    "dual_pack1": [*PACK1, "--pack_gap", "0", "0", "--pack_lead", "0", "0", "--pack_no_timestamps", "1", "--pack_noise", "span"],
    "dual_pack1_lead": [*PACK1, "--pack_gap", "0", "0", "--pack_lead", "0.1", "1.0", "--pack_no_timestamps", "1", "--pack_noise", "span"],
    "dual_pack1_ts": [*PACK1, "--pack_gap", "0", "0", "--pack_lead", "0", "0", "--pack_noise", "span"],
    "dual_pack1_window": [*PACK1, "--pack_gap", "0", "0", "--pack_lead", "0", "0", "--pack_no_timestamps", "1", "--pack_noise", "window"],
    "dual_pack1ts": PACK1,
}
# arms that see this many times the padded arms' clips (else as many)
CLIPS_SEEN = {arm: 6 for arm in ARMS if "_x6" in arm}
KINDS = ("white", "pink", "babble", "talker", "bank")
TRAIN_NOISE = "bank:0.4,white:0.1,brown:0.1,babble:0.2,talker:0.1"  # pink is kept for testing: a kind training never hears

SIZES = {
    "quick": dict(init_from=str(SHARED / "models" / "whisper-tiny.en"), languages="en", hours=0.5, max_iters=40, batch_size=8,
                  seeds="1,2,3", test_clips=20, warmup_iters=4, learning_rate=1e-4, sample_len=64),
    "full": dict(init_from=str(SHARED / "models" / "whisper-base"), languages="az", hours=6.0, max_iters=600, batch_size=32,
                 seeds="1,2,3", test_clips=300, warmup_iters=30, learning_rate=5e-5, sample_len=96),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_const", dest="size", const="quick", help=f"the CPU size: {SIZES['quick']}")
    p.add_argument("--full", action="store_const", dest="size", const="full", help=f"the GPU size: {SIZES['full']}")
    p.add_argument("--out", default=None, help="results folder (default runs/experiment-SIZE)")
    p.add_argument("--arms", default="plain,dual", help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--data", default=None, help="a prepared folder to use instead of making the corpus")
    p.add_argument("--init_from", default=None, help="the official checkpoint every arm starts from")
    p.add_argument("--language", default=None, help="language of the test clips (default: each clip's own)")
    p.add_argument("--languages", default=None, help="corpus languages (prepare.py --languages)")
    p.add_argument("--hours", type=float, default=None, help="corpus size")
    p.add_argument("--max_iters", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--warmup_iters", type=int, default=None)
    p.add_argument("--seeds", default=None, help="comma-separated training seeds, each one run of every arm")
    p.add_argument("--test_clips", type=int, default=None, help="the first N clips of the test split")
    p.add_argument("--kinds", default=",".join(KINDS), help="noise kinds evaluated")
    p.add_argument("--snrs", default="20,10,5,0,-5", help="SNRs (dB) evaluated; for talker, dB below the speech")
    p.add_argument("--train_noise", default=TRAIN_NOISE, help="train.py --noise of every arm")
    p.add_argument("--train_args", default="", help="more train.py flags for every arm, e.g. '--device cuda --dtype bfloat16'")
    p.add_argument("--device", default=None, help="device of the evaluation (default: cuda when available)")
    p.add_argument("--eval_batch", type=int, default=8, help="clips decoded together")
    p.add_argument("--sample_len", type=int, default=None, help="most tokens a decoding try samples (sample.py: n_text_ctx / 2): "
                                                              "a repetition loop stops there; test sentences are far shorter")
    p.add_argument("--eval_seed", type=int, default=0, help="seed of the evaluation noise (the same audio for every model)")
    p.add_argument("--offset", type=float, default=0.0, help="seconds of silence before every test clip (its noise over the clip "
                                                              "alone): the clip later in the window, as a longer recording's window "
                                                              "holds speech, not at 0 s as a short file's; use its own --out")
    p.add_argument("--no_official", action="store_true", help="leave out the official checkpoint's row")
    p.add_argument("--long_form", action="store_true", help="also transcribe one long file, the test clips one after another, with "
                                                            "timestamps as `sample.py FILE` does: are there segments where the clips start?")
    p.add_argument("--report", action="store_true", help="train and evaluate nothing: write the results of the seeds and conditions "
                                                         "evaluated so far (while a run goes on, or after it stopped)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch in every stage (0: torch's default); 1 is far "
                                                          "faster on a CPU that other jobs share, where threads wait for each other")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in a process of its own (the official row in "
                                                       "the first seed's); on a CPU, with --threads 1, one per core")
    return p


def resolve(args):
    size = SIZES[args.size or "quick"]
    for k, v in size.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = Path(args.out or f"runs/experiment-{args.size or 'custom'}")
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        sys.exit(f"experiment.py: error: unknown arm {unknown[0]!r}; the arms are {', '.join(ARMS)}")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.snrs = [float(s) for s in args.snrs.split(",")]
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def run(cmd, log):
    """Run a command, its output into `log`; stop with its last lines if it fails."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        rc = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        tail = Path(log).read_text().splitlines()[-15:]
        sys.exit(f"experiment.py: error: {cmd[1]} failed ({rc}); the end of {log}:\n" + "\n".join(tail))


# -----------------------------------------------------------------------------
# 1. data


def make_data(args):
    if args.data:
        return Path(args.data)
    data = args.out / "data"
    if not (data / "meta.json").exists() or "test" not in json.loads((data / "meta.json").read_text()).get("splits", {}):
        print(f"data: prepare.py --corpus {data} --hours {args.hours} --languages {args.languages}", flush=True)
        run([sys.executable, "prepare.py", "--corpus", data, "--hours", args.hours, "--languages", args.languages,
             "--model", args.init_from], args.out / "prepare.log")
    return data


# -----------------------------------------------------------------------------
# 2. training


def packed_iters(args, data, seed, flags, times=1):
    """Steps of a packed arm (train.py --pack with its --batch_size windows and --pack_clips, from
    `flags`) that see `times` as many clips as max_iters steps of batch_size clips: the windows
    holding the first times * max_iters * batch_size clips of the seed's packed stream, in whole steps."""
    import train

    arm = train.get_parser().parse_args([str(f) for f in flags])
    split = train.PreparedSplit(data, "train")
    clips, _ = train.usable_clips(split, 1 << 20, 448)
    stream = train.PackedStream.of_flags(split, clips, seed, arm)
    todo, windows = times * args.max_iters * args.batch_size, 0
    while todo > 0:
        todo -= len(stream[windows][2])
        windows += 1
    return -(-windows // arm.batch_size)


def train_seed(args, data, seed):
    """Train every arm with this seed; returns {run name: its log records}."""
    runs = {}
    for arm in args.arms:
        name = f"{arm}-s{seed}"
        out_dir = args.out / "runs" / name
        scale = CLIPS_SEEN.get(arm, 1)
        iters = packed_iters(args, data, seed, ARMS[arm], scale) if "--pack" in ARMS[arm] else args.max_iters * scale
        if not (out_dir / "latest" / "config.json").exists() or json.loads((out_dir / "latest" / "config.json").read_text())["iter_num"] < iters:
            print(f"train: {name}", flush=True)
            resume = ["--resume"] if (out_dir / "latest" / "state.pt").exists() else []
            run([sys.executable, "train.py", "--data", data, "--init_from", args.init_from, "--out_dir", out_dir, "--seed", seed,
                 "--max_iters", iters, "--batch_size", args.batch_size, "--learning_rate", args.learning_rate,
                 "--warmup_iters", args.warmup_iters, "--noise", args.train_noise, "--eval_samples", 0,
                 "--eval_interval", iters, "--log_interval", 1, "--log_data", *ARMS[arm], *args.train_args.split(), *resume],
                args.out / f"train-{name}.log")
        runs[name] = [json.loads(line) for line in open(out_dir / "log.jsonl")]
    return runs


def same_data(runs, args, seeds):
    """Per seed: did every arm see the same clips and the same noisy log-mel at every step?"""
    out = {}
    for seed in seeds:
        seen = {}
        for arm in [a for a in args.arms if "--pack" not in ARMS[a]]:  # packed arms see windows: the same clips, other batches
            steps = {r["iter"]: r.get("data") for r in runs[f"{arm}-s{seed}"] if r["event"] == "train"}  # the last record of a step wins
            seen[arm] = [steps.get(i) for i in range(1, args.max_iters + 1)]
        first = next(iter(seen.values()), [])
        out[str(seed)] = all(s == first for s in seen.values()) and all(d is not None for d in first)
    return out


def train_stats(records):
    steps = [r for r in records if r["event"] == "train"]
    times = [r["step_s"] for r in steps[1:]] or [r["step_s"] for r in steps]  # the first step warms up
    last = steps[-1]
    return {"seconds_per_step": statistics.median(times), "final_loss": last["loss"], "final_gate": last.get("gate"),
            "final_gate_abs": last.get("gate_abs")}


# -----------------------------------------------------------------------------
# 3. evaluation


def bank_split_of(data):
    """noise_test, the recordings kept for evaluation, where the data has them; else noise."""
    return "noise_test" if (data / "noise_test.index.npy").exists() else "noise"


def conditions(args, data, pool):
    from prepare import PreparedSplit

    bank_split = bank_split_of(data)
    bank = PreparedSplit(data, bank_split) if (data / f"{bank_split}.index.npy").exists() else None
    out = [("clean", None, None)]
    for kind in args.kinds:
        if kind == "bank" and bank is None:
            print("note: no noise recordings in the data: the bank condition is left out", flush=True)
            continue
        for snr in args.snrs:
            out.append((kind, snr, dw.NoiseMixer.fixed(kind, snr, bank=bank, pool=pool, seed=args.eval_seed)))
    return out


def score(refs, hyps, english):
    """Per clip with a reference: (word errors, reference words), as dw.error_counts counts them."""
    out = []
    for r, h in zip(refs, hyps):
        c = dw.error_counts([r], [h], None if english else ["other"])
        if c["clips"]:
            out.append((c["word_errors"], c["words"]))
    return out


ERROR_KINDS = ("substituted", "first_word", "deleted", "at_end", "inserted")


def error_kinds(refs, hyps, english):
    """Word errors of the clips by kind, summed: substituted (of them a clip's first word), deleted
    (of them those that reach a clip's last word) and inserted, from jiwer's alignment of the
    transcripts as dw.error_counts normalises them."""
    import jiwer

    out = dict.fromkeys(ERROR_KINDS, 0)
    for r, h in zip(refs, hyps):
        r, h = dw.normalize_text(r or "", english), dw.normalize_text(h or "", english)
        if not r:
            continue
        n = len(r.split())
        for chunk in jiwer.process_words(r, h).alignments[0]:
            width = chunk.ref_end_idx - chunk.ref_start_idx
            if chunk.type == "substitute":
                out["substituted"] += width
                out["first_word"] += chunk.ref_start_idx == 0
            elif chunk.type == "delete":
                out["deleted"] += width
                out["at_end"] += width if chunk.ref_end_idx == n else 0
            elif chunk.type == "insert":
                out["inserted"] += chunk.hyp_end_idx - chunk.hyp_start_idx
    return out


LONG_FORM_GAP = 1.0  # seconds of silence between the clips of the long-form file


def long_form(model, pool, refs, english, options, seed):
    """Timestamps on a long file: the clips of `pool` one after another, LONG_FORM_GAP s of silence
    between, transcribed as `sample.py FILE` transcribes (openai-whisper's sequential loop, each
    window moved on by the timestamps before it). Per clip, the nearest segment start to its own."""
    gap = np.zeros(int(LONG_FORM_GAP * dw.SAMPLE_RATE), dtype=np.float32)
    starts, pieces, t = [], [], 0
    for i in range(len(pool)):
        starts.append(t / dw.SAMPLE_RATE)
        pieces += [pool[i], gap]
        t += len(pool[i]) + len(gap)
    torch.manual_seed(seed)
    result = dw.transcribe(model, np.concatenate(pieces), **options)
    segment_starts = np.array([s["start"] for s in result["segments"]])
    errors = [float(np.abs(segment_starts - s).min()) if len(segment_starts) else float("inf") for s in starts]
    counts = dw.error_counts([" ".join(refs)], [result["text"]], None if english else ["other"])
    return {"seconds": round(t / dw.SAMPLE_RATE, 1), "clips": len(starts), "segments": len(segment_starts),
            "within_half_second": int(sum(e <= 0.5 for e in errors)), "median_start_error": float(np.median(errors)),
            "wer": counts["word_errors"] / max(counts["words"], 1)}


def summarise(clips):
    errors, words = np.array([c[0] for c in clips], dtype=float), np.array([c[1] for c in clips], dtype=float)
    return {"wer": float(errors.sum() / words.sum()), "capped_wer": float(np.minimum(errors, words).sum() / words.sum()),
            "median_clip_wer": float(np.median(errors / words)), "loops": int((errors > 2 * words).sum()), "clips": len(clips)}


def evaluate_models(args, models, data):
    """{name: {condition: summary, per-clip errors and transcripts}} of models {name: (path, dual)}, condition by
    condition, every model in turn (a stop leaves comparable conditions); each model's numbers are
    kept in OUT/eval/{name}.json as they come, and a second run reads them back."""
    import sample
    from prepare import PreparedSplit

    split = "test" if (data / "test.index.npy").exists() else "val"
    test = PreparedSplit(data, split)
    n = min(args.test_clips, len(test))
    pool = sample._Clips(test, n)
    rows = [test.row(i) for i in range(n)]
    refs = [r["text"] for r in rows]
    out, loaded = {}, {}
    cache_files = {name: args.out / "eval" / f"{name}.json" for name in models}
    for name, cache_file in cache_files.items():
        out[name] = json.loads(cache_file.read_text()) if cache_file.exists() else {"_offset": args.offset}
        offset = out[name].get("_offset", 0.0)
        if offset != args.offset:
            sys.exit(f"experiment.py: error: {cache_file} holds clips at {offset:g} s, not "
                     f"--offset {args.offset:g}: give this offset an --out of its own")

    def load(name, path, dual):
        if name not in loaded:
            model = dw.load_model(path, device=args.device, dtype=torch.float16 if args.device.startswith("cuda") else torch.float32, dual=dual)
            tokenizer = dw.get_tokenizer(model)
            languages = None if (args.language or not tokenizer.multilingual) else [r.get("language") for r in rows]
            english = (args.language or "en") == "en" if languages is None else all(lang in (None, "en") for lang in languages)
            options = sample.decode_options(sample.parse_args(["--eval", str(data)] + (["--language", args.language] if args.language else [])))
            options["sample_len"] = min(args.sample_len, model.dims.n_text_ctx // 2)
            loaded[name] = (model, languages, english, options)
            out[name]["_params"] = sum(p.numel() for p in model.parameters())
        return loaded[name]

    def keep(name):
        cache_file = cache_files[name]
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.with_suffix(".tmp").write_text(json.dumps(out[name]))
        os.replace(cache_file.with_suffix(".tmp"), cache_file)

    for kind, snr, mixer in conditions(args, data, pool):
        key = kind if snr is None else f"{kind} {snr:g}"
        for name, (path, dual) in models.items():
            if key in out[name]:
                continue
            model, languages, english, options = load(name, path, dual)
            t0 = time.time()
            torch.manual_seed(args.eval_seed)  # the fallback's sampling: the same draws for every model and condition
            hyps = sample.transcribe_pool(model, pool, mixer, languages, args.eval_batch, options, what=f"{data} {split}",
                                          lead=round(args.offset * dw.SAMPLE_RATE))
            clips = score(refs, hyps, english)
            out[name][key] = {**summarise(clips), "errors": [c[0] for c in clips], "words": [c[1] for c in clips],
                              "kinds": error_kinds(refs, hyps, english), "hyps": hyps, "seconds": round(time.time() - t0, 2)}
            print(f"  {name}: {key:<12} WER {100 * out[name][key]['wer']:6.1f}%  "
                  f"capped {100 * out[name][key]['capped_wer']:5.1f}%  ({out[name][key]['seconds']:.0f} s)", flush=True)
            keep(name)
    for name, (path, dual) in models.items():
        if args.long_form and "_long_form" not in out[name]:
            model, languages, english, options = load(name, path, dual)
            language = {"language": languages[0]} if languages and len(set(languages)) == 1 else {}
            out[name]["_long_form"] = r = long_form(model, pool, refs, english, {**options, **language}, args.eval_seed)
            print(f"  {name}: long form: {r['segments']} segments for {r['clips']} clips, {r['within_half_second']} within 0.5 s "
                  f"of a clip's start, median start error {r['median_start_error']:.2f} s, WER {100 * r['wer']:.1f}%", flush=True)
            keep(name)
    return out


# -----------------------------------------------------------------------------
# 4. results


def mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def write_results(args, data, runs, evals, checks, bank_split):
    keys = [k for k in next(iter(evals.values())) if not k.startswith("_") and all(k in e for e in evals.values())]
    arms = (["official"] if "official" in evals else []) + args.arms
    table = {}
    for arm in arms:
        names = ["official"] if arm == "official" else [f"{arm}-s{s}" for s in args.seeds]
        row = {"runs": names, "params": evals[names[0]]["_params"]}
        if arm != "official":
            stats = [train_stats(runs[n]) for n in names]
            row["seconds_per_step"] = mean_spread([s["seconds_per_step"] for s in stats])
            row["final_gate_abs"] = mean_spread([s["final_gate_abs"] for s in stats])
        for metric in ("capped_wer", "wer"):
            row[metric] = {k: mean_spread([evals[n][k][metric] for n in names]) for k in keys}
            noisy = [k for k in keys if k != "clean"]
            row[metric]["noisy mean"] = mean_spread([np.mean([evals[n][k][metric] for k in noisy]) for n in names] if noisy else [])
        table[arm] = row
    paired = {}  # per seed, arm minus plain over the same data: the difference a seed cannot explain away
    if "plain" in args.arms:
        for arm in args.arms:
            if arm == "plain":
                continue
            diffs = {k: [evals[f"{arm}-s{s}"][k]["capped_wer"] - evals[f"plain-s{s}"][k]["capped_wer"] for s in args.seeds] for k in keys}
            noisy = [np.mean([diffs[k][i] for k in keys if k != "clean"]) for i in range(len(args.seeds))] if len(keys) > 1 else []
            paired[arm] = {"per_condition": {k: mean_spread(v) for k, v in diffs.items()}, "noisy_mean": mean_spread(noisy),
                           "seeds_better": int(sum(d < 0 for d in noisy)), "seeds": len(args.seeds)}
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "data": str(data),
               "bank_split": bank_split, "same_data_per_seed": checks, "arms": table, "paired_vs_plain": paired,
               "runs": {n: train_stats(r) for n, r in runs.items()}, "evaluations": evals,
               "hardware": {"device": args.device, "cpus": os.cpu_count(), "torch": torch.__version__,
                            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(args, results, keys, arms))
    plot(args, results, keys, arms)
    return results


def kind_mean(row, keys, kind):
    values = [row[k][0] for k in keys if k.startswith(kind + " ")]
    return f"{100 * np.mean(values):.1f}" if values else "-"


def fmt(ms, scale=100, digits=1):
    m, s = ms
    return "-" if m is None else f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def markdown(args, results, keys, arms):
    t = results["arms"]
    n_clips = results["evaluations"][t[arms[-1]]["runs"][0]]["clean"]["clips"]
    offset = results["evaluations"][t[arms[-1]]["runs"][0]].get("_offset", 0.0)
    lines = ["# Dual against plain Whisper under noise", "",
             f"{args.init_from}, {args.max_iters} steps of {args.batch_size} clips, seeds {', '.join(map(str, args.seeds))} "
             f"(mean ± standard deviation over seeds), {n_clips} test clips of {results['data']}, bank noise from {results['bank_split']}; "
             f"same clips and noise for every arm of a seed: {results['same_data_per_seed']}"
             + (" (packed arms: windows of clips from the same stream, as many steps as see as many clips; each arm's "
                "train.py flags are in tools/experiment.py" + "".join(f"; {a}: {CLIPS_SEEN[a]} times as many clips" for a in args.arms
                                                                      if a in CLIPS_SEEN) + ")"
                if any("--pack" in ARMS[a] for a in args.arms) else "")
             + (f"; every test clip after {offset:g} s of silence" if offset else "")
             + ". Capped WER (%): a clip's errors count at most its words.", "",
             "| arm | parameters | s/step | clean | noisy mean | " + " | ".join(args.kinds) + " |",
             "|---|---|---|---|---|" + "---|" * len(args.kinds)]
    for arm in arms:
        r = t[arm]
        step = r.get("seconds_per_step")
        lines.append(f"| {arm} | {r['params'] / 1e6:.2f}M | {'-' if step is None else f'{step[0]:.2f}'} | {fmt(r['capped_wer']['clean'])} | "
                     f"{fmt(r['capped_wer']['noisy mean'])} | " + " | ".join(kind_mean(r["capped_wer"], keys, kind) for kind in args.kinds) + " |")
    if results["paired_vs_plain"]:
        lines += ["", "Arm minus plain on the same seed (capped WER points; negative: better than plain):", "",
                  "| arm | noisy mean | seeds better | clean | " + " | ".join(args.kinds) + " |",
                  "|---|---|---|---|" + "---|" * len(args.kinds)]
        for arm, p in results["paired_vs_plain"].items():
            lines.append(f"| {arm} | {fmt(p['noisy_mean'])} | {p['seeds_better']}/{p['seeds']} | {fmt(p['per_condition']['clean'])} | "
                         + " | ".join(kind_mean(p["per_condition"], keys, kind) for kind in args.kinds) + " |")
    with_long = [arm for arm in arms if all("_long_form" in results["evaluations"][n] for n in t[arm]["runs"])]
    if with_long:
        lf = {arm: [results["evaluations"][n]["_long_form"] for n in t[arm]["runs"]] for arm in with_long}
        first = lf[with_long[0]][0]
        lines += ["", f"Long form: the {first['clips']} test clips one after another with {LONG_FORM_GAP:g} s of silence between "
                      f"({first['seconds']:.0f} s), transcribed with timestamps as `sample.py FILE` does (mean over seeds):", "",
                  "| arm | segments | clips with a segment start within 0.5 s | median start error (s) | WER (%) |", "|---|---|---|---|---|"]
        for arm, rs in lf.items():
            lines.append(f"| {arm} | {np.mean([r['segments'] for r in rs]):.1f} | {np.mean([r['within_half_second'] for r in rs]):.1f} | "
                         f"{np.mean([r['median_start_error'] for r in rs]):.2f} | {100 * np.mean([r['wer'] for r in rs]):.1f} |")
    evals = results["evaluations"]
    counted = [k for k in keys if k != "clean" and all("kinds" in evals[n][k] for arm in arms for n in t[arm]["runs"])]
    if counted:
        lines += ["", "Word errors by kind, summed over the runs of an arm: substituted (of them a clip's first word), deleted "
                      "(of them at a clip's end: deletions that reach its last word), inserted; words normalised as the WER's:", "",
                  "| condition | arm | reference words | substituted | first word | deleted | at the end | inserted |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in counted:
            for arm in arms:
                total = {e: sum(evals[n][k]["kinds"][e] for n in t[arm]["runs"]) for e in ERROR_KINDS}
                words = sum(sum(evals[n][k]["words"]) for n in t[arm]["runs"])
                lines.append(f"| {k} dB | {arm} | {words} | " + " | ".join(str(total[e]) for e in ERROR_KINDS) + " |")
    for kind in args.kinds:
        cols = [k for k in keys if k.startswith(kind + " ")]
        if not cols:
            continue
        lines += ["", f"{kind} (capped WER %, then corpus WER %)", "", "| arm | " + " | ".join(c.split()[1] + " dB" for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for arm in arms:
            r = t[arm]
            lines.append(f"| {arm} | " + " | ".join(f"{fmt(r['capped_wer'][c])} ({100 * r['wer'][c][0]:.0f})" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(args, results, keys, arms):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no matplotlib: the plot is left out (pip install matplotlib)", flush=True)
        return
    kinds = [k for k in args.kinds if any(c.startswith(k + " ") for c in keys)]
    if not kinds:
        return
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.2), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        cols = [c for c in keys if c.startswith(kind + " ")]
        x = [float(c.split()[1]) for c in cols]
        for i, arm in enumerate(arms):
            r = results["arms"][arm]["capped_wer"]
            m = np.array([100 * r[c][0] for c in cols])
            s = np.array([100 * r[c][1] for c in cols])
            line, = ax.plot(x, m, marker="o", ms=3, label=arm, ls="--" if arm == "official" else "-", color=f"C{i}")
            if arm != "official":
                ax.fill_between(x, m - s, m + s, alpha=0.2, color=line.get_color())
        ax.set_title(kind if kind != "talker" else "talker (dB below speech)")
        ax.set_xlabel("SNR (dB)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("capped WER (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "wer_vs_snr.png", dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------


def report(args):
    data = Path(args.data) if args.data else args.out / "data"
    evals_all = {p.stem: json.loads(p.read_text()) for p in sorted((args.out / "eval").glob("*.json"))}
    evals = evals_all
    seeds = [s for s in args.seeds if all(f"{arm}-s{s}" in evals for arm in args.arms)]
    if not seeds:
        sys.exit(f"experiment.py: error: no seed of {args.out} has every arm evaluated yet")
    runs = {f"{arm}-s{s}": [json.loads(line) for line in open(args.out / "runs" / f"{arm}-s{s}" / "log.jsonl")] for s in seeds for arm in args.arms}
    evals = {k: v for k, v in evals.items() if k in runs}
    if "official" in evals_all and set(evals[f"{args.arms[0]}-s{seeds[0]}"]) <= set(evals_all["official"]):
        evals = {"official": evals_all["official"], **evals}  # its row, once it has every condition the arms have
    args.seeds = seeds
    results = write_results(args, data, runs, evals, same_data(runs, args, seeds), bank_split_of(data))
    print((args.out / "results.md").read_text())
    print(f"{len(results['arms'])} rows over seeds {seeds}; conditions: {', '.join(k for k in evals[f'{args.arms[0]}-s{seeds[0]}'] if not k.startswith('_'))}")
    return 0


def in_parallel(args, data, argv, t0):
    """Each seed as `experiment.py ... --seeds S --jobs 1` in a process of its own, --jobs at a
    time (its output in OUT/seed-S.log), then the report of all."""
    base = [sys.executable, str(Path(__file__).resolve())] + [a for a in _without(argv, ("--seeds", "--jobs", "--data"))]
    waiting, running = list(args.seeds), []
    while waiting or running:
        while waiting and len(running) < args.jobs:
            seed = waiting.pop(0)
            extra = ["--no_official"] if seed != args.seeds[0] else []
            log = open(args.out / f"seed-{seed}.log", "w")
            print(f"seed {seed}: {args.out / f'seed-{seed}.log'}", flush=True)
            running.append((seed, log, subprocess.Popen(base + ["--seeds", str(seed), "--data", str(data), *extra], stdout=log,
                                                        stderr=subprocess.STDOUT, cwd=ROOT)))
        time.sleep(1)
        for item in [r for r in running if r[2].poll() is not None]:
            seed, log, proc = item
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                for _, _, other in running:
                    other.terminate()
                tail = (args.out / f"seed-{seed}.log").read_text().splitlines()[-15:]
                sys.exit(f"experiment.py: error: seed {seed} failed ({proc.returncode}):\n" + "\n".join(tail))
    args.data = str(data)
    report(args)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {args.out}/results.json, results.md, wer_vs_snr.png", flush=True)
    return 0


def _without(argv, flags):
    """argv less the given flags and their values (as --flag value or --flag=value)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in flags)):
            out.append(a)
    return out


def main(argv=None):
    args = resolve(get_parser().parse_args(argv))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # train.py and prepare.py, run as commands
    t0 = time.time()
    print(f"experiment: {args.out}: arms {args.arms}, seeds {args.seeds}, {args.init_from}, {args.max_iters} steps of {args.batch_size}",
          flush=True)
    if args.report:
        return report(args)
    data = make_data(args)
    if args.jobs > 1 and len(args.seeds) > 1:
        return in_parallel(args, data, argv if argv is not None else sys.argv[1:], t0)
    evals, runs, seeds = {}, {}, args.seeds
    for k, seed in enumerate(seeds):  # seed by seed, the results rewritten after each: a stop leaves the seeds done
        runs.update(train_seed(args, data, seed))
        checks = same_data(runs, args, seeds[:k + 1])
        print(f"same clips and noisy log-mel for every arm of seed {seed}: {checks[str(seed)]}", flush=True)
        evals.update(evaluate_models(args, {f"{arm}-s{seed}": (args.out / "runs" / f"{arm}-s{seed}" / "latest", "--plain" not in ARMS[arm])
                                            for arm in args.arms}, data))
        if k == 0 and not args.no_official:  # the official checkpoint's row, once the first seed's comparison is in
            evals.update(evaluate_models(args, {"official": (args.init_from, False)}, data))
        args.seeds = seeds[:k + 1]
        write_results(args, data, runs, evals, checks, bank_split_of(data))
        print((args.out / "results.md").read_text(), flush=True)
    print(f"done in {(time.time() - t0) / 60:.1f} min: {args.out}/results.json, results.md, wer_vs_snr.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
