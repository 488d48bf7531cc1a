"""
train.py: fine-tune dual-attention Whisper from official weights on prepared data, under noise.

  python prepare.py --demo && python train.py     # the demo: tiny.en on data/demo, on a CPU, minutes
  python train.py --data data/az --init_from openai/whisper-small --out_dir out/az --max_iters 20000 ...
  torchrun --standalone --nproc_per_node=8 train.py --data data/az ...        # one node, 8 GPUs
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 train.py ...
  python train.py --out_dir out/az --resume       # go on after a stop or a kill
  python train.py --pack --batch_size 1           # windows of one speaker's clips with timestamps: 4-5x the clips/s

The file reads top to bottom: config, setup, data, model, optimizer, evaluation, then the loop.
A run folder holds latest/ (weights plus everything a resume needs) and best/ (the best evaluation
so far), each a folder that dualwhisper.load_model and `sample.py --model` read, and log.jsonl.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import dualwhisper as dw
from prepare import PreparedSplit

SHARED = Path(os.environ.get("DUALWHISPER_SHARED", Path(__file__).resolve().parent.parent / "shared"))
DEFAULT_MODEL = str(SHARED / "models" / "whisper-tiny.en") if (SHARED / "models" / "whisper-tiny.en").is_dir() else "tiny.en"
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # fused AdamW kernels exist for these (on this project's CPU 4.6x faster)
DEFAULT_NOISE = "bank:0.3,white:0.05,pink:0.05,brown:0.05,babble:0.2,talker:0.15"


class TrainError(Exception):
    """A problem with the user's input or settings: reported in one line, exit status 2."""


# -----------------------------------------------------------------------------
# config: argparse flags (nanoGPT's names where it has one); the defaults are the CPU demo


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=dw.HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", help="a TOML or JSON file of flag values, e.g. max_iters = 5000 (data, never executed); "
                                    "flags given on the command line win")
    g.add_argument("--data", default="data/demo", help="a prepare.py output folder (splits train, val and optionally noise)")
    g.add_argument("--out_dir", default="out", help="the run folder: latest/, best/ and log.jsonl")
    g.add_argument("--init_from", default=DEFAULT_MODEL, help="weights to start from: an official name (tiny.en, small), a hub id, "
                                                              "a folder in the hub layout, an OpenAI .pt file, or one of our folders")
    g.add_argument("--resume", action="store_true", help="continue the run in --out_dir from latest/: weights, optimizer, scaler, "
                                                         "RNG and data position; the stored config is the default for every flag")
    g.add_argument("--plain", action="store_true", help="train plain single-cross-attention Whisper with this loop (the baseline)")
    g.add_argument("--freeze", default="encoder", help="parts kept fixed, comma-separated: encoder, decoder (the primary decoder), "
                                                       "base (everything but the new dual-attention parts); or none")
    g.add_argument("--seed", type=int, default=1337, help="seed of the data order, the noise and the new parameters")
    g.add_argument("--gate", default="tanh", choices=dw.GATES, help="form of the gate (ablations): tanh, zero-init over [state, a, b], "
                                                                 "one value per token; sigmoid, the convex mix (1-g) a + g b (exact at init "
                                                                 "only with --branch2 copy); channel, one value per channel; layer, one "
                                                                 "zero-init scalar per layer")
    g.add_argument("--branch2", default="fresh", choices=dw.BRANCH2, help="the secondary cross-attention at the start: freshly "
                                                                         "initialised, or a copy of the primary")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max_iters", type=int, default=30, help="optimizer steps in all")
    g.add_argument("--batch_size", type=int, default=8, help="global batch: clips (with --pack: windows) per optimizer step over all "
                                                              "ranks and micro-steps")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step on each rank")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate of the pretrained parameters")
    g.add_argument("--dual_lr_mult", type=float, default=3.0, help="learning-rate multiplier of the new parts (second "
                                                                    "cross-attention, its norm, the gate), so that the gate opens in a short fine-tune")
    g.add_argument("--min_lr", type=float, default=None, help="learning rate at the end of the cosine decay (default learning_rate / 10)")
    g.add_argument("--warmup_iters", type=int, default=5, help="linear warmup steps")
    g.add_argument("--lr_decay_iters", type=int, default=None, help="steps of cosine decay (default max_iters)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay of linear and conv weights (never norms, "
                                                                    "biases, embeddings or gates)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--max_bad_steps", type=int, default=10, help="stop after this many non-finite losses in a row (each is skipped)")
    g.add_argument("--consistency", type=float, default=0.0, help="weight of a consistency loss: KL from what the frozen --init_from "
                                                                  "model predicts on the clean audio to what the trained model predicts "
                                                                  "on the noisy audio, per target token (plain and dual alike)")
    g = p.add_argument_group("packing: short clips filled into Whisper's 30-second windows, each a timestamped segment")
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=False,
                   help="train on windows of several clips of one speaker (or language, --pack_by), in stream order, with "
                        "silence between them, and Whisper's timestamped targets (evaluation stays per clip)")
    g.add_argument("--pack_gap", type=float, nargs=2, default=[0.1, 1.0], metavar=("LOW", "HIGH"),
                   help="seconds of silence before each clip of a window")
    g.add_argument("--pack_lead", type=float, nargs=2, default=[-1.0, 1.0], metavar=("LOW", "HIGH"),
                   help="seconds of silence before a window's first clip, drawn from [LOW, HIGH] and cut at 0: -1 1 "
                        "starts half of the windows at 0 s, as a transcribed clip starts, and half after up to 1 s")
    g.add_argument("--pack_by", choices=["speaker", "language"], default="speaker",
                   help="speaker: a window holds clips of one speaker (prepare.py's speaker column; clips without one go by "
                        "language); language: of one language")
    g.add_argument("--pack_clips", type=int, default=0, help="most clips in a window (0: as many as fit)")
    g.add_argument("--pack_alone", type=float, default=0.05,
                   help="share of clips (drawn per stream position) that fill a window alone, at 0 s and with silence after, "
                        "as a short file is transcribed: more buys per-clip accuracy under noise with speed")
    g.add_argument("--pack_no_timestamps", type=float, default=0.5,
                   help="share of windows whose target is <|notimestamps|> and the texts alone, so both decoding modes keep working")
    g.add_argument("--pack_noise", choices=["window", "clip", "span"], default="span",
                   help="window: one noise draw fills the window at its clips' SNR; clip: a draw (kind, SNR, sources) per clip, "
                        "each over its clip and the silence before it (the last to the window's end); span: a draw per clip "
                        "over the clip alone, as padded training mixes it, the silence between clips left silent")
    g = p.add_argument_group("noise augmentation (on the device, drawn per clip from the seed and its data position)")
    g.add_argument("--noise", default=DEFAULT_NOISE, help="kind:probability per clip, comma-separated; the rest stays clean. Kinds: "
                                                          "bank (the data's noise split), white, pink, brown, babble, talker (a second "
                                                          "speaker at a lower level); 'none' for clean training")
    g.add_argument("--snr_db", type=float, nargs=2, default=[0.0, 20.0], metavar=("LOW", "HIGH"), help="SNR range of the noise")
    g.add_argument("--talker_db", type=float, nargs=2, default=[5.0, 15.0], metavar=("LOW", "HIGH"),
                   help="how many dB the second talker is below the speech")
    g.add_argument("--babble_talkers", type=int, nargs=2, default=[3, 6], metavar=("LOW", "HIGH"), help="talkers in a babble")
    g.add_argument("--spec_augment", action="store_true", help="SpecAugment: 2 frequency and 2 time masks per clip")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval_interval", type=int, default=15, help="evaluate and save latest/ (and best/) every this many steps")
    g.add_argument("--eval_samples", type=int, default=16, help="validation clips for the loss and the greedy WER/CER (all ranks share them)")
    g.add_argument("--eval_noise", default="babble", choices=dw.NOISE_KINDS, help="noise of the fixed-SNR evaluation conditions")
    g.add_argument("--eval_snr", type=float, nargs="*", default=[5.0], help="SNRs (dB) evaluated besides clean speech")
    g.add_argument("--eval_seed", type=int, default=0, help="seed of the evaluation noise (sample.py --eval --snr uses the same "
                                                            "default: the same clip gets the same noisy audio in both)")
    g.add_argument("--eval_only", action="store_true", help="evaluate the initial model and stop")
    g.add_argument("--log_interval", type=int, default=1, help="steps between progress lines")
    g.add_argument("--log_data", action="store_true", help="log the clips and a checksum of the noisy log-mel of each step (with --log_interval 1), so that "
                                                          "two runs can be checked to have seen the same data")
    g = p.add_argument_group("system")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (default: bfloat16 on GPUs that have it, else float16 with a GradScaler; float32 on the CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model (default: on CUDA)")
    g.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode; reduce-overhead replays CUDA graphs, which takes the kernel launches off the host "
                        "(whisper-small, batch 16 on an H200: 35%% MFU against 29 to 33%%), one graph per batch length (multiples of 8)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in the backward pass to save memory")
    return p


def read_config_file(path, parser):
    """Flag values from a TOML or JSON file, checked against the parser's flags."""
    path = Path(path)
    try:
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(path.read_text())
        else:
            values = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"config file not found: {path}") from None
    except Exception as e:
        raise TrainError(f"cannot read config file {path}: {e}") from None
    return checked_values(values, parser, f"config file {path}")


def checked_values(values, parser, source):
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in values.items():
        if key not in actions or key in ("help", "config", "resume"):
            raise TrainError(f"{source}: unknown setting {key!r}")
        action = actions[key]
        if action.type is not None and value is not None:
            try:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            except (TypeError, ValueError):
                raise TrainError(f"{source}: {key} = {value!r} is not a valid value") from None
        out[key] = value
    return out


def parse_config(argv=None):
    """defaults < the stored config of a resumed run < --config file < command line."""
    parser = get_parser()
    args = parser.parse_args(argv)
    defaults = {}
    if args.resume:
        ckpt = find_latest(args.out_dir)
        if ckpt is None:
            raise TrainError(f"--resume: no checkpoint in {args.out_dir} (expected {args.out_dir}/latest/state.pt)")
        # a run from before a flag existed resumes as it was trained: padded, or packed as --pack first packed
        before = {"pack": False, "pack_noise": "window", "pack_lead": None, "pack_by": "language", "pack_clips": 0,
                  "pack_alone": 0.0}
        stored = {**before, **json.loads((ckpt / "config.json").read_text())["train_config"]}
        defaults.update(checked_values({k: v for k, v in stored.items() if k not in ("resume", "config")}, parser, f"{ckpt}/config.json"))
    if args.config:
        defaults.update(read_config_file(args.config, parser))
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def resolve(args):
    """Fill in the automatic settings and check the rest; the result is printed and stored."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device_type = dw.usable_device(args.device).type
    except ValueError as e:
        raise TrainError(str(e)) from None
    if args.dtype is None:
        args.dtype = "float32" if device_type != "cuda" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if args.compile is None:
        args.compile = device_type == "cuda"
    if args.min_lr is None:
        args.min_lr = args.learning_rate / 10
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.max_iters
    args.freeze = ",".join(sorted(parse_freeze(args.freeze))) or "none"
    parse_noise(args.noise)
    for name in ("max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "max_bad_steps"):
        if getattr(args, name) < (0 if name == "max_iters" else 1):
            raise TrainError(f"--{name} must be positive, not {getattr(args, name)}")
    for name in ("learning_rate", "min_lr", "dual_lr_mult", "weight_decay", "grad_clip", "warmup_iters", "lr_decay_iters", "eval_samples",
                 "consistency"):
        if not getattr(args, name) >= 0:  # (nan too)
            raise TrainError(f"--{name} must not be negative, not {getattr(args, name)}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise TrainError(f"--{name} must lie in [0, 1), not {getattr(args, name)}")
    if args.pack_clips < 0:
        raise TrainError(f"--pack_clips is a number of clips (0: as many as fit), not {args.pack_clips}")
    for name in ("pack_no_timestamps", "pack_alone"):
        if not 0 <= getattr(args, name) <= 1:
            raise TrainError(f"--{name} is a share in [0, 1], not {getattr(args, name)}")
    for flag, low in (("pack_gap", 0), ("pack_lead", -dw.CHUNK_LENGTH)):
        value = getattr(args, flag)
        if value is not None and not low <= value[0] <= value[1] < dw.CHUNK_LENGTH:
            raise TrainError(f"--{flag} must be seconds LOW <= HIGH in [{low}, {dw.CHUNK_LENGTH}), not {value}")
    return args


def parse_freeze(value):
    parts = {p.strip() for p in value.split(",") if p.strip()} - {"none"}
    unknown = parts - {"encoder", "decoder", "base"}
    if unknown:
        raise TrainError(f"--freeze: unknown part {sorted(unknown)[0]!r}; choose from encoder, decoder, base, none")
    if "base" in parts:
        parts = (parts - {"base"}) | {"encoder", "decoder"}
    return parts


def parse_noise(value):
    """'bank:0.3,babble:0.2' -> {'bank': 0.3, 'babble': 0.2}."""
    if value.strip() in ("", "none"):
        return {}
    kinds = {}
    for item in value.split(","):
        kind, _, p = item.partition(":")
        try:
            kinds[kind.strip()] = float(p)
        except ValueError:
            raise TrainError(f"--noise: {item!r} is not kind:probability (e.g. babble:0.2)") from None
    unknown = set(kinds) - set(dw.NOISE_KINDS)
    if unknown:
        raise TrainError(f"--noise: unknown kind {sorted(unknown)[0]!r}; the kinds are {', '.join(dw.NOISE_KINDS)}")
    if any(not 0 <= p <= 1 for p in kinds.values()) or sum(kinds.values()) > 1 + 1e-6:
        raise TrainError(f"--noise: probabilities must lie in [0, 1] and sum to at most 1 ({value})")
    return kinds


# -----------------------------------------------------------------------------
# setup: distributed, device, precision, seeds (one function, as nanochat's compute_init)


def setup(args):
    """Returns (rank, local_rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE:
    NCCL on GPUs, gloo on CPUs."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    device = torch.device(args.device)
    if ddp:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions where the GPU has them
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    return rank, local_rank, world_size, device


def all_sum(values, device, world_size):
    """Sum a list of numbers over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# data: prepare.py's memmapped splits, an endless shuffled stream, batches on the device


class Stream:
    """The usable clips of a split in a fresh random order every epoch, as one endless stream:
    position k is clip order(k // n)[k % n]. A run's data position is the next position to read,
    and a clip's position is the key of its noise, so that any split of a global batch over ranks
    and micro-steps, and any resume, sees exactly the same data."""

    def __init__(self, clips, seed):
        self.clips, self.seed, self._orders = np.asarray(clips), seed, {}

    def __getitem__(self, k):
        epoch, i = divmod(int(k), len(self.clips))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.clips)}
        return int(self._orders[epoch][i])


TIMESTAMP_SAMPLES = dw.SAMPLE_RATE // 50  # Whisper's timestamps step by 0.02 s


class PackedStream:
    """Whisper's 30-second windows filled with clips of the Stream: clips of the same prompt
    (language and task), and with by_speaker of the same speaker, go in stream order into their
    group's open window, the first at a lead of silence and each next after a gap (both drawn per
    stream position from the seed); a clip that does not fit (in samples, or in decoder tokens with
    timestamps) closes the window and starts the next. With `alone`, a share of the clips (drawn per
    stream position) each fill a window of their own at 0 s instead, spaced among the packed
    windows to keep that share of clips throughout. Windows are numbered in the order they close,
    an epoch's last open ones in the order they opened, and never span two epochs, so that an
    epoch holds every clip once. Window k is (key, prompt, [(clip, offset)]), its key the stream
    position of its first clip: the key of its noise, SpecAugment and target format. Like Stream,
    it depends on the seed alone, never on ranks or batches."""

    def __init__(self, split, clips, seed, gap=(0.1, 1.0), no_timestamps=None, n_text_ctx=448, max_clips=0, lead=None,
                 by_speaker=False, alone=0.0):
        self.stream, self.seed, self.gap, self.lead, self.no_timestamps = Stream(clips, seed), seed, gap, lead, no_timestamps
        self.alone = alone
        self.max_clips = max_clips or len(clips)
        self.lengths = {int(c): int(split.lengths[c]) for c in clips}
        self.prompts, self.n_text, self.groups = {}, {}, {}
        for c in self.lengths:  # the prompt, the number of text tokens and the window group of each clip
            seq = split.tokens(c)
            self.prompts[c] = prompt_of(seq, no_timestamps)
            self.n_text[c] = len(seq) - len(self.prompts[c]) - 1
            self.groups[c] = (self.prompts[c], split.row(c).get("speaker") if by_speaker else None)
        self.budget = n_text_ctx + 1  # tokens of a window's whole sequence: inputs are all but its last
        self.counts, self._epoch = [], (None, [])  # windows per packed epoch; the last epoch packed

    @classmethod
    def of_flags(cls, split, clips, seed, args, no_timestamps=None, n_text_ctx=448):
        """The packed stream that train.py's --pack_* flags (parsed into `args`) make."""
        return cls(split, clips, seed, args.pack_gap, no_timestamps, n_text_ctx, args.pack_clips, args.pack_lead,
                   args.pack_by == "speaker", args.pack_alone)

    def gaps(self, epoch, lead=False):
        """The silence before each clip of an epoch in stream order, samples in whole timestamp steps
        (0.02 s): after the clip before it, or (lead) at the start of a window."""
        if lead and self.lead is not None:
            (low, high), draw = self.lead, 5
        else:  # between clips, or a lead drawn as the gaps are
            (low, high), draw = self.gap, 3
        seconds = np.random.default_rng([self.seed, draw, epoch]).uniform(low, high, size=len(self.stream.clips))
        return (np.maximum(seconds, 0) * dw.SAMPLE_RATE).astype(np.int64) // TIMESTAMP_SAMPLES * TIMESTAMP_SAMPLES

    def pack_epoch(self, epoch):
        n = len(self.stream.clips)
        opened, closed, waiting = {}, [], deque()  # group -> [key, clips, end sample, tokens]; closed windows in order; alone ones
        packed_clips, alone_clips = 0, 0
        gaps = self.gaps(epoch).tolist()
        leads = self.gaps(epoch, lead=True).tolist() if self.lead is not None else gaps  # without --pack_lead, drawn as the gaps
        alone = (np.random.default_rng([self.seed, 7, epoch]).random(n) < self.alone).tolist()

        def close(w):
            # a packed window, then the alone windows waiting that keep the share (a packed window closes
            # only when full, so alone windows closed at once would crowd the epoch's first windows)
            nonlocal packed_clips, alone_clips
            if w is not None:
                closed.append(w)
                packed_clips += len(w[1])
            while waiting and alone_clips * (1 - self.alone) <= self.alone * packed_clips:
                closed.append(waiting.popleft())
                alone_clips += 1

        for i, (gap, lead) in enumerate(zip(gaps, leads)):
            position = epoch * n + i
            c = self.stream[position]
            prompt, L = self.prompts[c], self.lengths[c]
            if alone[i]:  # a window of its own at 0 s; its group's open window stays open
                waiting.append([position, [(c, 0)]])
                close(None)
                continue
            tokens = self.n_text[c] + 2  # the text between its two timestamps
            w = opened.get(self.groups[c])
            start = (-(-w[2] // TIMESTAMP_SAMPLES) * TIMESTAMP_SAMPLES if w else 0) + gap  # on a timestamp
            if w is not None and (start + L > dw.N_SAMPLES or w[3] + tokens > self.budget or len(w[1]) == self.max_clips):
                close(w)
                w = None
            if w is None:
                start = min(lead, (dw.N_SAMPLES - L) // TIMESTAMP_SAMPLES * TIMESTAMP_SAMPLES)
                # the prompt less <|notimestamps|>, plus <|endoftext|>
                w = opened[self.groups[c]] = [position, [], 0, len(prompt) + (prompt[-1] != self.no_timestamps)]
            w[1].append((c, start))
            w[2], w[3] = start + L, w[3] + tokens
        for w in sorted(opened.values(), key=lambda w: w[0]):
            close(w)
        closed += waiting
        return [(w[0], self.prompts[w[1][0][0]], w[1]) for w in closed]

    def __getitem__(self, k):
        k, epoch = int(k), 0
        while True:
            if epoch == len(self.counts):
                self._epoch = (epoch, self.pack_epoch(epoch))
                self.counts.append(len(self._epoch[1]))
            if k < self.counts[epoch]:
                if self._epoch[0] != epoch:
                    self._epoch = (epoch, self.pack_epoch(epoch))
                return self._epoch[1][k]
            k, epoch = k - self.counts[epoch], epoch + 1


def usable_clips(split, n_vocab, n_text_ctx):
    """Indices of the clips a model can train on, and a count of the others by reason: checked
    once from the index and token file, so that a bad clip never reaches (or kills) a step."""
    audio_len, token_len = np.asarray(split.index["audio_len"]), np.asarray(split.index["token_len"])
    max_token = np.array([split.tokens(i).max(initial=0) for i in range(len(split))], dtype=np.int64)
    reasons = {"empty audio": audio_len <= 0, "audio over 30 s": audio_len > dw.N_SAMPLES,
               "too few tokens": token_len < 2, "more tokens than n_text_ctx": token_len - 1 > n_text_ctx,
               "token ids beyond the vocabulary": max_token >= n_vocab}
    bad = np.zeros(len(split), dtype=bool)
    counts = {}
    for reason, mask in reasons.items():
        counts[reason] = int((mask & ~bad).sum())
        bad |= mask
    return np.flatnonzero(~bad), {k: v for k, v in counts.items() if v}


def get_batch(split, indices, no_timestamps, eot, n_text_ctx, device, multiple=1):
    """Audio (B, N_SAMPLES) int16 and lengths on the device, decoder inputs and targets (B, T):
    targets are the next tokens, -100 on the prompt (start, language, task, <|notimestamps|>) and
    on padding, so that the loss counts the text and <|endoftext|> only. T is the longest
    sequence's length rounded up to a `multiple` (8 for torch.compile: fewer distinct shapes; in
    eager mode each padding position costs time, most of all in the cross-attention)."""
    audio, seqs = split.batch(indices, dtype=np.int16)
    lengths = np.minimum(split.lengths[np.asarray(indices)], dw.N_SAMPLES)
    prompts = [prompt_of(s, no_timestamps) for s in seqs]
    return to_device(audio, device), torch.as_tensor(lengths), *decoder_io(seqs, prompts, eot, n_text_ctx, device, multiple), prompts


def prompt_of(seq, no_timestamps):
    """The prompt that begins a clip's token sequence: up to <|notimestamps|> (start, language, task)."""
    at = np.flatnonzero(seq == no_timestamps)
    return tuple(seq[:int(at[0]) + 1 if len(at) else 1].tolist())


def decoder_io(seqs, prompts, eot, n_text_ctx, device, multiple=1):
    """Decoder inputs and targets (B, T) of token sequences that begin with their prompts."""
    T = max(len(s) for s in seqs) - 1
    T = min(-(-T // multiple) * multiple, n_text_ctx)
    x = np.full((len(seqs), T), eot, dtype=np.int64)
    y = np.full((len(seqs), T), -100, dtype=np.int64)
    for b, (s, prompt) in enumerate(zip(seqs, prompts)):
        x[b, :len(s) - 1], y[b, len(prompt) - 1:len(s) - 1] = s[:-1], s[len(prompt):]
    return to_device(x, device), to_device(y, device)


def to_device(a, device):
    return (torch.from_numpy(a).pin_memory() if device.type == "cuda" else torch.from_numpy(a)).to(device, non_blocking=True)


def window_batch(split, windows, tokenizer, n_text_ctx, device, multiple=1, seed=0, no_timestamps_share=0.5, unreadable=None):
    """A batch of packed windows: audio (B, N_SAMPLES) int16 on the device, each clip at its offset
    and silence between; spans, per window the (start, end) samples of its clips; decoder inputs and
    targets (B, T); prompts. The target is Whisper's: <|start|> text <|end|> per clip, in order, or,
    for a share of windows (drawn from the seed and the window's key), <|notimestamps|> and the
    texts alone. A clip that fails to read is left out of its window and added to `unreadable`."""
    audio = np.zeros((len(windows), dw.N_SAMPLES), dtype=np.int16)
    seqs, prompts, spans = [], [], []
    for b, (key, clip_prompt, clips) in enumerate(windows):
        timestamps = np.random.default_rng([seed, 4, key]).random() >= no_timestamps_share
        prompt = list(clip_prompt[:-1] if timestamps and clip_prompt[-1] == tokenizer.no_timestamps else clip_prompt)
        seq, row = list(prompt), []
        for c, offset in clips:
            if unreadable is not None and c in unreadable:
                continue
            try:
                x, tokens = split.audio(c), split.tokens(c)
                audio[b, offset:offset + len(x)] = x
            except Exception as e:  # whatever a damaged file or index raises: the clip is left out
                if unreadable is None:
                    raise
                unreadable[c] = f"{type(e).__name__}: {e}"[:200]
                continue
            text = tokens[len(clip_prompt):-1].tolist()  # between the prompt and <|endoftext|>
            if timestamps:
                text = [timestamp_token(tokenizer, offset, floor=True), *text, timestamp_token(tokenizer, offset + len(x))]
            seq += text
            row.append((offset, offset + len(x)))
        seqs.append(np.array(seq + [tokenizer.eot], dtype=np.int64))
        prompts.append(tuple(prompt))
        spans.append(row)
    return to_device(audio, device), spans, *decoder_io(seqs, prompts, tokenizer.eot, n_text_ctx, device, multiple), prompts



def mix_per_clip(mixer, audio, keys, exclude, spans, fill=True):
    """Packed windows (B, N_SAMPLES) with a noise draw per clip: the window cut into pieces, each
    a clip and the silence before it (the last running to the window's end; fill=False: the clip
    alone, the silence left silent), mixed as rows of their own with keys (window key, clip
    number), and put back."""
    pieces = []  # (window, start, end, the clip's span in the piece, key, exclude)
    for b, row in enumerate(spans):
        for i, (a, e) in enumerate(row):
            start, end = a, e
            if fill:  # from the previous clip's end, and the last clip to the window's end
                start = row[i - 1][1] if i else 0
                end = e if i + 1 < len(row) else audio.shape[-1]
            pieces.append((b, start, end, (a - start, e - start), (int(keys[b]), i), None if exclude is None else exclude[b]))
    if not pieces:
        return audio
    rows = torch.zeros(len(pieces), max(p[2] - p[1] for p in pieces), device=audio.device)
    for r, (b, start, end, *_) in enumerate(pieces):
        rows[r, :end - start] = audio[b, start:end]
    noisy = mixer(rows, [p[2] - p[1] for p in pieces], [p[4] for p in pieces], None if exclude is None else [p[5] for p in pieces],
                  [[p[3]] for p in pieces])
    out = audio.clone()
    for r, (b, start, end, *_) in enumerate(pieces):
        out[b, start:end] = noisy[r, :end - start]
    return out


def timestamp_token(tokenizer, sample, floor=False):
    """The timestamp token of a sample position: rounded to the nearest 0.02 s, or down."""
    step = sample // TIMESTAMP_SAMPLES if floor else (sample + TIMESTAMP_SAMPLES // 2) // TIMESTAMP_SAMPLES
    return tokenizer.timestamp_begin + min(int(step), dw.N_SAMPLES // TIMESTAMP_SAMPLES)


def readable(split, indices, clips, unreadable):
    """`indices` with every clip that fails to read replaced by the next usable clip that reads, so
    that a bad clip never stops a run; `unreadable` collects them. Returns (indices, newly failed)."""
    new = []

    def reads(i):
        if i in unreadable:
            return False
        try:
            split.batch([i])
            return True
        except Exception as e:  # whatever a damaged file or index raises: the clip is left out
            unreadable[i] = f"{type(e).__name__}: {e}"[:200]
            new.append(i)
            return False

    out = []
    for i in indices:
        at = int(np.searchsorted(clips, i))
        for step in range(len(clips)):
            j = int(clips[(at + step) % len(clips)])
            if reads(j):
                out.append(j)
                break
        else:
            raise TrainError(f"no clip of {split.folder} {split.split} can be read: {unreadable[i]}")
    return out, new


def log_mel(audio, lengths, n_mels, mixer=None, keys=None, exclude=None, spec_augment=False, seed=0, spans=None, pack_noise="window"):
    """int16 audio (B, N_SAMPLES) on the device -> noisy log-mel (B, n_mels, 3000), on the device.
    Packed windows give their clips' spans: the noise fills the window, its SNR measured over the
    clips (pack_noise "clip": each clip's own draw over it and the silence before it; "span": each
    clip's own draw over the clip alone), and SpecAugment masks up to the last clip's end."""
    audio = audio.float() / 32768.0
    if spans is not None:
        lengths = torch.full((len(audio),), audio.shape[-1])
    if mixer is not None and spans is not None and pack_noise != "window":
        audio = mix_per_clip(mixer, audio, keys, exclude, spans, fill=pack_noise == "clip")
    elif mixer is not None:
        audio = mixer(audio, lengths, keys, exclude, spans)
    mel = dw.log_mel_spectrogram(audio, n_mels)
    if spec_augment:
        if spans is not None:
            lengths = torch.tensor([row[-1][1] if row else 0 for row in spans])
        mel = dw.spec_augment(mel, (lengths + dw.HOP_LENGTH - 1) // dw.HOP_LENGTH, keys, seed)
    return mel


# -----------------------------------------------------------------------------
# checkpoints: save_model folders, written to a temporary name and renamed into place


def find_latest(out_dir):
    """The newest complete latest/ checkpoint (a kill between two renames leaves latest.old)."""
    for name in ("latest", "latest.old"):
        folder = Path(out_dir) / name
        if (folder / "state.pt").exists() and (folder / "config.json").exists():
            return folder
    return None


def save_checkpoint(model, out_dir, name, extra, state=None):
    """Write out_dir/name atomically: a complete folder under a temporary name (weights in
    safetensors, config.json with `extra`, tokenizer files, and state.pt for a resume), renamed
    into place; the folder it replaces is renamed away first and removed last."""
    out_dir = Path(out_dir)
    source_dir = model.source_dir
    tmp = out_dir / f".{name}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    dw.save_model(model, tmp, extra)
    model.source_dir = source_dir  # save_model points it at the folder it wrote; keep the original
    if state is not None:
        torch.save(state, tmp / "state.pt.tmp")
        os.replace(tmp / "state.pt.tmp", tmp / "state.pt")
    final, old = out_dir / name, out_dir / f"{name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def rng_states():
    """This process's random generators, in types that torch.load(weights_only=True) reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
              "python": [version, list(mt), py_gauss]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, py_gauss = states["python"]
    random.setstate((version, tuple(mt), py_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def param_digest(model):
    """One int64 per parameter: the sum of its raw bits, equal on two ranks only if the
    parameters are (almost surely) bit-identical."""
    return [int(p.detach().float().contiguous().view(torch.int32).sum(dtype=torch.int64)) for p in model.parameters()]


# -----------------------------------------------------------------------------
# optimizer and learning rate


def configure_optimizer(model, args, device_type):
    """AdamW, fused on FUSED_ADAMW_DEVICES, with four groups: {pretrained, new} x {decay, no decay}.
    Only linear and conv weights decay; the new dual-attention parameters get dual_lr_mult times
    the learning rate."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = dw.is_dual_parameter(name)
        decay = p.dim() >= 2 and "embedding" not in name and "gate" not in name.split(".")
        groups.setdefault((new, decay), []).append(p)
    param_groups = [{"params": ps, "weight_decay": args.weight_decay if decay else 0.0, "lr_mult": args.dual_lr_mult if new else 1.0,
                     "name": ("new" if new else "pretrained") + (" decay" if decay else "")}
                    for (new, decay), ps in sorted(groups.items())]
    if not param_groups:
        raise TrainError(f"nothing to train: --freeze {args.freeze} leaves no trainable parameters" + (" (--plain has no new parts)" if args.plain else ""))
    return torch.optim.AdamW(param_groups, lr=args.learning_rate, betas=(args.beta1, args.beta2), fused=device_type in FUSED_ADAMW_DEVICES)


def get_lr(it, args):
    """Linear warmup, then cosine decay to min_lr over lr_decay_iters."""
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    if it >= args.lr_decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)


# -----------------------------------------------------------------------------
# evaluation: loss and greedy WER/CER, clean and at fixed SNRs, shared by all ranks


# sample.py --eval's decoding with the same options prints the same numbers:
#   --temperature 0 --without_timestamps --no_speech_threshold None --logprob_threshold None --compression_ratio_threshold None
EVAL_DECODING = dict(temperature=0.0, without_timestamps=True, no_speech_threshold=None, logprob_threshold=None,
                     compression_ratio_threshold=None)


@torch.no_grad()
def evaluate(model, tokenizer, val, conditions, clips, micro_batch, autocast, rank, world_size, device):
    """{condition: {loss, wer, cer, words}} over `clips` of val, split over the ranks and summed.
    The transcripts are dw.transcribe_many's with EVAL_DECODING (greedy, no timestamps, fallback
    or no-speech skipping), of the audio that the noise mixer gives the loss, scored by
    dw.error_counts: the path of sample.py --eval."""
    was_training = model.training
    model.eval()
    mine = clips[rank::world_size]
    results, examples = {}, {}
    for name, mixer in conditions.items():
        sums = dict.fromkeys(("loss", "tokens") + dw.ERROR_COUNTS, 0.0)
        for start in range(0, len(mine), micro_batch):
            indices = [int(i) for i in mine[start:start + micro_batch]]
            audio, lengths, x, y, _ = get_batch(val, indices, tokenizer.no_timestamps, tokenizer.eot, model.dims.n_text_ctx, device)
            audio = audio.float() / 32768.0
            if mixer is not None:  # a clip never babbles over itself
                audio = mixer(audio, lengths, indices, indices if mixer.pool is val else None)
            with autocast:
                logits = model(dw.log_mel_spectrogram(audio, model.dims.n_mels), x)
            sums["loss"] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum").item()
            sums["tokens"] += int((y != -100).sum())
            rows = [val.row(i) for i in indices]
            languages = [r.get("language") for r in rows] if tokenizer.multilingual else None
            clips_audio = [audio[b, :int(n)].cpu().numpy() for b, n in enumerate(lengths)]
            with autocast:
                out = dict(dw.transcribe_many(model, clips_audio, batch_size=len(indices), languages=languages, **EVAL_DECODING))
            hyps = [out[b]["text"] if isinstance(out[b], dict) else "" for b in range(len(indices))]
            refs = [r["text"] for r in rows]
            english = languages is None or languages[0] in (None, "en")
            examples.setdefault(name, (dw.normalize_text(refs[0], english), dw.normalize_text(hyps[0], english)))
            for k, v in dw.error_counts(refs, hyps, languages).items():
                if k in sums:
                    sums[k] += v
        total = dict(zip(sums, all_sum(list(sums.values()), device, world_size)))
        wer, cer = dw.error_rates(total)
        results[name] = {"loss": total["loss"] / max(total["tokens"], 1), "wer": wer if total["words"] else 0.0,
                         "cer": cer if total["chars"] else 0.0, "words": int(total["words"])}
    model.train(was_training)
    return results, examples


# -----------------------------------------------------------------------------
# the run


def main(argv=None):
    try:
        return run(resolve(parse_config(argv)))
    except TrainError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    rank, local_rank, world_size, device = setup(args)
    master = rank == 0
    device_type = device.type
    log_file = Path(args.out_dir) / "log.jsonl"

    def log(record, echo=None):
        if master:
            if echo:
                print(echo, flush=True)
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    try:
        # ---- config, printed and stored in every checkpoint
        micro_batch, rest = divmod(args.batch_size, world_size * args.gradient_accumulation_steps)
        if rest or micro_batch == 0:
            raise TrainError(f"--batch_size {args.batch_size} must be a multiple of ranks ({world_size}) x "
                             f"--gradient_accumulation_steps ({args.gradient_accumulation_steps})")
        out_dir = Path(args.out_dir)
        latest = find_latest(out_dir)
        if latest is not None and not args.resume and not args.eval_only:
            raise TrainError(f"{out_dir} already holds a run ({latest.name}/); pass --resume to continue it, or another --out_dir")
        config = {k: v for k, v in vars(args).items() if k not in ("config",)}

        # ---- data
        train_split = PreparedSplit(args.data, "train")
        # the val split serves evaluation: optional with --eval_samples 0, else a missing one is PreparedSplit's error
        has_val = (Path(args.data) / "val.index.npy").exists() or args.eval_samples > 0
        val_split = PreparedSplit(args.data, "val") if has_val else None
        bank = PreparedSplit(args.data, "noise") if (Path(args.data) / "noise.index.npy").exists() else None
        noise = parse_noise(args.noise)
        if "bank" in noise and (bank is None or len(bank) == 0):
            if args.noise != DEFAULT_NOISE:
                raise TrainError(f"--noise asks for 'bank' but {args.data} has no noise split; prepare one with prepare.py --noise_dir")
            noise.pop("bank")  # the default asks for the bank only where there is one

        # ---- model
        resume = latest if args.resume else None
        torch.manual_seed(args.seed)  # new dual-attention parts are drawn from the seed: the same on every rank
        try:
            model = dw.load_model(resume or args.init_from, device="cpu", dual=not args.plain, gate=args.gate, branch2=args.branch2)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise TrainError(f"{resume or '--init_from ' + str(args.init_from)}: {e}") from None
        teacher = None
        if args.consistency > 0:  # the official model, frozen: its predictions on the clean audio are the targets of the KL
            teacher = dw.load_model(args.init_from, device=device, dual=False).requires_grad_(False)
        tokenizer = dw.get_tokenizer(model)
        frozen = parse_freeze(args.freeze)
        for name, p in model.named_parameters():
            part = name.split(".")[0]
            p.requires_grad_(not (part in frozen and not dw.is_dual_parameter(name)))
        model = model.to(device)
        model.gradient_checkpointing(args.gradient_checkpointing)
        dims = model.dims
        train_clips, train_bad = usable_clips(train_split, dims.n_vocab, dims.n_text_ctx)
        val_clips, val_bad = usable_clips(val_split, dims.n_vocab, dims.n_text_ctx) if val_split is not None else ([], {})
        for name, clips, bad in (("train", train_clips, train_bad), ("val", val_clips, val_bad)):
            if len(clips) == 0 and (name == "train" or args.eval_samples > 0):
                raise TrainError(f"{args.data}: split {name} has no usable clips ({f'all left out: {bad}' if bad else 'it is empty'})"
                                 + ("; evaluation needs some (prepare.py --val_fraction above 0), or pass --eval_samples 0" if name == "val" else ""))
        mixer = dw.NoiseMixer(noise, bank, train_split, args.snr_db, args.talker_db, args.babble_talkers, args.seed) if noise else None
        eval_clips = val_clips[:args.eval_samples]
        conditions = {"clean": None}
        pool = val_split if len(val_clips) >= 2 else train_split  # babble and talkers never heard in training, where there are enough
        for snr in args.eval_snr if len(eval_clips) else []:
            conditions[f"{args.eval_noise} {snr:g} dB"] = dw.NoiseMixer.fixed(args.eval_noise, snr, bank, pool, seed=args.eval_seed)
    except (FileNotFoundError, ValueError, ConnectionError) as e:  # data, model or settings the user gave
        raise TrainError(str(e)) from None

    if master:
        print(f"data: {args.data}: train {len(train_clips)} clips, val {len(val_clips)} (evaluating {len(eval_clips)}), "
              f"noise bank {len(bank) if bank is not None else 0} recordings" +
              (f"; left out: train {train_bad}" if train_bad else "") + (f", val {val_bad}" if val_bad else ""))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"model: {args.init_from if resume is None else resume} ({'plain' if args.plain else 'dual'}), "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained "
              f"(frozen: {args.freeze}); {world_size} rank(s), micro-batch {micro_batch} x {args.gradient_accumulation_steps} "
              f"accumulation x {world_size} = {args.batch_size}; {args.dtype} on {device}{', compiled' if args.compile else ''}", flush=True)
        if not args.plain and args.branch2 == "copy" and args.gate != "sigmoid":
            print("note: --branch2 copy: b - a = 0, so a zero gate gets no gradient until the copies drift apart", flush=True)
        if not args.plain and args.branch2 == "fresh" and args.gate == "sigmoid":
            print("note: --gate sigmoid over a fresh branch mixes in half of a random branch at step 0 (not the official model)", flush=True)

    # ---- optimizer, precision, compile, DDP
    optimizer = configure_optimizer(model, args, device_type)
    if master:  # the settings, data and model are good: now the run folder
        out_dir.mkdir(parents=True, exist_ok=True)
        print("config:", json.dumps(config), flush=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    iter_num, position, best, bad_in_a_row, bad_total, clips_seen = 0, 0, None, 0, 0, 0
    if resume is not None:
        state = torch.load(resume / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        iter_num, position, best, bad_total = state["iter_num"], state["position"], state["best"], state["bad_steps"]
        clips_seen = state.get("clips_seen", position)
        set_rng_states(state["rng"][rank] if len(state["rng"]) == world_size else state["rng"][0])
        if master:
            print(f"resuming from {resume} at step {iter_num} (data position {position}, best {best})", flush=True)
    raw_model = model
    gates = []  # gate values of the current forward, per dual layer (B, T, 1), the mean over channels
    for block in raw_model.decoder.blocks:
        if getattr(block, "dual", False):
            if block.gate_kind == "layer":  # one scalar: g = tanh(gate) for every token of the branch's output
                block.cross_attn2.register_forward_hook(
                    lambda module, inputs, output, b=block: gates.append(torch.tanh(b.gate.detach().float()).expand(*output[0].shape[:2], 1)))
            else:
                act = torch.sigmoid if block.gate_kind == "sigmoid" else torch.tanh
                block.gate.register_forward_hook(lambda module, inputs, output, act=act: gates.append(act(output.detach().float()).mean(-1, keepdim=True)))
    graphs = args.compile and device_type == "cuda" and args.compile_mode in ("reduce-overhead", "max-autotune")  # CUDA graphs
    multiple = 8 if args.compile else 1  # batches' text lengths: fewer shapes to compile, else no padding beyond the longest
    if args.compile:
        model = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)  # before the DDP wrap; checkpoints always come from raw_model
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    stream = (PackedStream.of_flags(train_split, train_clips, args.seed, args, tokenizer.no_timestamps, dims.n_text_ctx)
              if args.pack else Stream(train_clips, args.seed))
    if resume is not None and args.pack:
        stream.counts = list(state.get("window_counts", []))  # so that the epochs before are not packed again
    unreadable = {}  # clip -> error, for clips that passed the checks but failed to read

    def load(keys, items):
        """(noise keys, the clips each row's noise leaves out, audio, lengths, spans, inputs, targets,
        clips) of a micro-batch on the device. A clip that passed the checks but cannot be read is
        logged and left out from then on: replaced by the next one, or in a window by silence."""
        if args.pack:
            known = len(unreadable)
            audio, spans, x, y, _ = window_batch(train_split, items, tokenizer, dims.n_text_ctx, device, multiple, args.seed,
                                                 args.pack_no_timestamps, unreadable)
            for i in list(unreadable)[known:]:
                log({"event": "bad_clip", "iter": iter_num + 1, "index": i, "error": unreadable[i]},
                    f"step {iter_num + 1}: clip {i} of {args.data} train cannot be read ({unreadable[i]}); left out from now on")
            return [w[0] for w in items], [[c for c, _ in w[2]] for w in items], audio, None, spans, x, y, sum(map(len, spans))
        indices = [i if i not in unreadable else readable(train_split, [i], train_clips, unreadable)[0][0] for i in items]
        try:
            audio, lengths, x, y, _ = get_batch(train_split, indices, tokenizer.no_timestamps, tokenizer.eot, dims.n_text_ctx, device, multiple)
        except Exception:  # find the clip, replace it, go on
            indices, new = readable(train_split, indices, train_clips, unreadable)
            if not new:
                raise
            for i in new:
                log({"event": "bad_clip", "iter": iter_num + 1, "index": i, "error": unreadable[i]},
                    f"step {iter_num + 1}: clip {i} of {args.data} train cannot be read ({unreadable[i]}); left out from now on")
            audio, lengths, x, y, _ = get_batch(train_split, indices, tokenizer.no_timestamps, tokenizer.eot, dims.n_text_ctx, device, multiple)
        return keys, indices, audio, lengths, None, x, y, len(indices)

    def save(name, metrics, rngs=None):
        """best/ (weights and config) or, with the RNG states of every rank, latest/ (and state.pt)."""
        extra = {"train_config": config, "iter_num": iter_num, "eval": metrics}
        state = None
        if rngs is not None:
            state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": iter_num, "position": position,
                     "best": best, "bad_steps": bad_total, "rng": rngs, "clips_seen": clips_seen,
                     "window_counts": getattr(stream, "counts", [])}
        folder = save_checkpoint(raw_model, out_dir, name, extra, state)
        log({"event": "checkpoint", "iter": iter_num, "path": str(folder)})

    def run_eval():
        if len(eval_clips) == 0:
            return {}
        if master:
            print(f"eval at step {iter_num}: {len(eval_clips)} clips, {', '.join(conditions)} ...", flush=True)
        results, examples = evaluate(raw_model, tokenizer, val_split, conditions, eval_clips, micro_batch, autocast, rank, world_size, device)
        gates.clear()  # the hooks saw the evaluation's forward passes too
        line = " | ".join(f"{k}: loss {v['loss']:.3f} WER {100 * v['wer']:.1f}% CER {100 * v['cer']:.1f}%" for k, v in results.items())
        log({"event": "eval", "iter": iter_num, "results": results, "examples": examples}, f"eval at step {iter_num}: {line}")
        for k, (ref, hyp) in examples.items():
            if master:
                print(f"  {k}: ref {ref!r}\n  {' ' * len(k)}  hyp {hyp!r}")
        return results

    if master:
        log({"event": "config", "config": config, "world_size": world_size, "resume_from": str(resume) if resume else None})
    history = []  # (iter, results) of each evaluation in this process
    if args.eval_only:
        run_eval()
        return finish(world_size)

    # ---- the loop
    model.train()
    start_iter, t_train, n_timed, clips_timed, t_eval = iter_num, 0.0, 0, 0, 0.0
    while True:
        # evaluate and save every eval_interval steps and at the end; not again at the step a run resumed from
        if (iter_num % args.eval_interval == 0 or iter_num == args.max_iters) and not (resume is not None and iter_num == start_iter):
            t_eval = time.perf_counter()
            results = run_eval()
            improved = False
            if results:
                history.append((iter_num, results))
                score = float(np.mean([r["wer"] for r in results.values()]))  # mean WER over the conditions: lower is better
                improved = best is None or score < best
                best = score if improved else best
            rngs = [rng_states()]
            if world_size > 1:
                rngs = [None] * world_size
                dist.all_gather_object(rngs, rng_states())
            if master:
                if improved:
                    save("best", results)
                save("latest", results, rngs)
            t_eval = time.perf_counter() - t_eval  # the last evaluation and its checkpoints, for the ETA
        if iter_num >= args.max_iters:
            break

        # one optimizer step: the global batch is positions [position, position + batch_size) of the
        # stream (of clips, or of windows); micro-step m of rank r takes its m * world_size + r -th slice
        t0 = time.perf_counter()
        lr = get_lr(iter_num, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        slices = []
        for micro_step in range(args.gradient_accumulation_steps):
            first = position + (micro_step * world_size + rank) * micro_batch
            keys = list(range(first, first + micro_batch))
            slices.append((keys, [stream[k] for k in keys]))
        # the loss is the sum over the global batch's target tokens divided by their number, whatever the split
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        batches = [load(keys, items) for keys, items in slices]
        global_tokens, step_clips = all_sum([sum(int((b[6] != -100).sum()) for b in batches), sum(b[7] for b in batches)], device, world_size)
        gate_sum = torch.zeros(2, device=device)  # sums of g and |g| over the target tokens, averaged over layers
        kl_sum, data = torch.zeros((), device=device, dtype=torch.float64), []
        for micro_step, (keys, exclude, audio, lengths, spans, x, y, _) in enumerate(batches):
            mel = log_mel(audio, lengths, dims.n_mels, mixer, keys, exclude, args.spec_augment, args.seed, spans, args.pack_noise)
            if args.log_data:
                ramp = torch.arange(mel.shape[-1], device=device, dtype=torch.float64)
                data.append([[int(k) for k in keys], mel.double().sum().item(), (mel.double() * ramp).sum().item()])
            last = micro_step == len(batches) - 1
            sync = model.no_sync() if world_size > 1 and not last else nullcontext()  # gradients all-reduce on the last micro-step
            gates.clear()
            with sync:
                with autocast:
                    if teacher is None:
                        ce = model(mel, x, y, reduction="sum")  # over the target tokens, from float32 logits
                        loss = ce
                    else:  # cross-entropy plus the KL to the frozen model's predictions on the clean audio
                        keep = y != -100
                        logp = F.log_softmax(model(mel, x)[keep].float(), dim=-1)  # (N, n_vocab)
                        ce = F.nll_loss(logp, y[keep], reduction="sum")
                        with torch.no_grad():
                            target = F.log_softmax(teacher(log_mel(audio, lengths, dims.n_mels), x)[keep].float(), dim=-1)
                        kl = F.kl_div(logp, target, log_target=True, reduction="sum")
                        kl_sum += kl.detach().double()
                        loss = ce + args.consistency * kl
                scaler.scale(loss * (world_size / global_tokens)).backward()
            if graphs and not last and micro_step == 0:
                # the gradients are the backward graph's outputs, in memory that its next replay
                # overwrites: the next micro-steps add to copies of them
                for q in params:
                    if q.grad is not None:
                        q.grad = q.grad.clone()
            loss_sum += ce.detach().double()
            if gates:
                keep = (y != -100)[None]
                g = torch.stack(gates)[..., 0] * keep  # (layers, B, T)
                gate_sum += torch.stack([g.sum(), g.abs().sum()]) / len(gates)
        # non-finite on any rank: skip the step on every rank, and count it
        loss_total, gate_total, gate_abs, kl_total, bad = all_sum([loss_sum.item(), *gate_sum.tolist(), kl_sum.item(),
                                                                   float(not math.isfinite(loss_sum.item()))], device, world_size)
        loss_value, gate_value, gate_abs = loss_total / global_tokens, gate_total / global_tokens, gate_abs / global_tokens
        grad_norm = float("nan")
        if bad:
            optimizer.zero_grad(set_to_none=True)
            bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
            log({"event": "skip", "iter": iter_num + 1, "loss": loss_value, "bad_in_a_row": bad_in_a_row},
                f"step {iter_num + 1}: non-finite loss, step skipped ({bad_in_a_row} in a row, {bad_total} in all)")
            if bad_in_a_row >= args.max_bad_steps:
                if master:
                    print(f"train.py: error: stopping: {bad_in_a_row} non-finite losses in a row at step {iter_num + 1}; "
                          f"the last good checkpoint is {find_latest(out_dir)}. Lower --learning_rate, or use --dtype "
                          f"bfloat16/float32 instead of float16", file=sys.stderr, flush=True)
                finish(world_size)
                sys.exit(3)
        else:
            bad_in_a_row = 0
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf")))
            if math.isfinite(grad_norm) or scaler.is_enabled():
                scaler.step(optimizer)  # with float16, the scaler itself skips a step whose gradients overflowed
                scaler.update()
            else:  # a finite loss with non-finite gradients (the norm is the same on every rank)
                bad_total += 1
                log({"event": "skip", "iter": iter_num + 1, "loss": loss_value, "grad_norm": grad_norm},
                    f"step {iter_num + 1}: non-finite gradient norm, step skipped ({bad_total} in all)")
            optimizer.zero_grad(set_to_none=True)
        position += args.batch_size
        iter_num += 1
        clips_seen += int(step_clips)

        dt = time.perf_counter() - t0
        if iter_num > start_iter + 1:  # the first step warms up (and compiles)
            t_train, n_timed, clips_timed = t_train + dt, n_timed + 1, clips_timed + int(step_clips)
        if iter_num % args.log_interval == 0 or iter_num == args.max_iters:
            per_step, clips_per_s = (t_train / n_timed, clips_timed / t_train) if n_timed else (dt, step_clips / dt)
            evals_left = args.max_iters // args.eval_interval - (iter_num - 1) // args.eval_interval + int(args.max_iters % args.eval_interval > 0)
            eta = per_step * (args.max_iters - iter_num) + t_eval * evals_left
            record = {"event": "train", "iter": iter_num, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "gate": gate_value if gates else None, "gate_abs": gate_abs if gates else None,
                      "samples_per_s": args.batch_size / per_step, "clips_per_s": clips_per_s, "clips_seen": clips_seen,
                      "step_s": dt, "skipped": bad_total, "eta_s": eta}
            if teacher is not None:
                record["kl"] = kl_total / global_tokens
            if args.log_data:
                record["data"] = data
            log(record, f"step {iter_num}/{args.max_iters}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}"
                        + (f", gate {gate_value:+.3f} (|g| {gate_abs:.3f})" if gates else "")
                        + (f", {args.batch_size / per_step:.2f} windows/s ({clips_per_s:.2f} clips/s)" if args.pack
                           else f", {args.batch_size / per_step:.2f} samples/s") + f", eta {eta / 60:.1f} min")

    # ---- the end: ranks agree on every parameter bit; the WER before and after
    if world_size > 1:
        digests = [None] * world_size
        dist.all_gather_object(digests, param_digest(raw_model))
        same = all(d == digests[0] for d in digests)
        log({"event": "ddp_check", "ranks_identical": same, "digests": [sum(d) for d in digests]},
            f"ranks hold identical parameters: {same}")
        if not same:
            raise RuntimeError("ranks diverged: the parameters differ between ranks")
    if master and len(history) >= 2:
        (i0, first), (i1, last) = history[0], history[-1]
        print(f"WER on {len(eval_clips)} held-out clips of {args.data}: " + "; ".join(
            f"{k}: {100 * first[k]['wer']:.1f}% at step {i0} -> {100 * last[k]['wer']:.1f}% at step {i1}" for k in first))
    if master:
        kept = f"{out_dir}/best (lowest mean WER) and {out_dir}/latest" if (out_dir / "best").is_dir() else f"{out_dir}/latest"
        print(f"done: {kept}; transcribe with: python sample.py --model {out_dir} FILE")
    return finish(world_size)


def finish(world_size):
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
