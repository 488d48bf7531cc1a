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
    raise SystemExit("not written yet")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["transcribe", "train", "prepare"])
    args, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    {"transcribe": bench_transcribe, "train": bench_train, "prepare": bench_prepare}[args.what](rest)
