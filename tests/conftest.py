"""Shared fixtures. Assets come from ../shared (or $DUALWHISPER_SHARED); tests that need an asset
or an optional reference skip where it is missing, except in CI (CI=true), where they fail."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dualwhisper as dw  # noqa: E402 (the repository's modules, from ROOT)
import prepare  # noqa: E402
import train  # noqa: E402

SHARED = Path(os.environ.get("DUALWHISPER_SHARED", ROOT.parent / "shared"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(path_or_module):
    """The asset path or imported module, or skip (fail in CI) when it is not there."""
    if isinstance(path_or_module, Path):
        if path_or_module.exists():
            return path_or_module
        what = f"asset {path_or_module}"
    else:
        try:
            return importlib.import_module(path_or_module)
        except ImportError:
            what = f"module {path_or_module}"
    if IN_CI:
        pytest.fail(f"{what} is missing in CI")
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def tiny_en_dir():
    return need(SHARED / "models" / "whisper-tiny.en")


@pytest.fixture(scope="session")
def multilingual_tokenizer_dir():
    return need(SHARED / "tokenizers" / "whisper-multilingual")


@pytest.fixture(scope="session")
def jfk_path():
    return need(SHARED / "audio" / "jfk.flac")


@pytest.fixture(scope="session")
def jfk_audio(jfk_path):
    import dualwhisper as dw

    return dw.load_audio(jfk_path)


@pytest.fixture(scope="session")
def tiny_en(tiny_en_dir):
    import dualwhisper as dw

    return dw.load_model(tiny_en_dir)


@pytest.fixture(scope="session")
def tiny_en_plain(tiny_en_dir):
    import dualwhisper as dw

    return dw.load_model(tiny_en_dir, dual=False)


@pytest.fixture(scope="session")
def openai_whisper_from(tiny_en_plain):
    """openai-whisper's own model class holding the same weights: our plain model's state dict
    uses openai-whisper's names, so it loads as it is."""
    whisper = need("whisper")

    def build(plain):
        dims = {k: v for k, v in vars(plain.dims).items() if k in whisper.model.ModelDimensions.__dataclass_fields__}
        ref = whisper.model.Whisper(whisper.model.ModelDimensions(**dims))
        ref.load_state_dict(plain.state_dict())
        return ref.eval()

    return build


@pytest.fixture(scope="session")
def openai_tiny_en(openai_whisper_from, tiny_en_plain):
    return openai_whisper_from(tiny_en_plain)


@pytest.fixture(scope="session")
def long_audio(jfk_audio):
    """61 s of real speech with pauses: the phrases of jfk.flac rearranged, some slower or faster,
    between silences of 3 to 5 s, so that windows end mid-phrase and seek by timestamps."""
    sec = lambda a, b: jfk_audio[int(a * dw.SAMPLE_RATE):int(b * dw.SAMPLE_RATE)]
    p1, p2, p3, p4 = sec(0, 2.6), sec(2.6, 4.7), sec(4.7, 7.9), sec(7.9, 11.0)
    pause = lambda s: np.zeros(int(s * dw.SAMPLE_RATE), np.float32)
    slower = lambda a, rate: dw.resample(a, dw.SAMPLE_RATE, rate)  # played at 16 kHz: slower above 16000, faster below
    audio = np.concatenate([p3, pause(3), p1, slower(p4, 17600), pause(4.5), p2, slower(p3, 14400), pause(4), p3, pause(5),
                            p4, pause(4), slower(p1, 17200), pause(3.5), p2, pause(4.5), p4, pause(4)])
    assert len(audio) > 60 * dw.SAMPLE_RATE
    return audio.astype(np.float32)


# what long_audio says: its phrases in order
LONG_TEXT = ("what your country can do for you and so my fellow americans ask what you can do for your country ask not what your "
             "country can do for you what your country can do for you ask what you can do for your country and so my fellow "
             "americans ask not ask what you can do for your country")


# -----------------------------------------------------------------------------
# training and data: a tiny random model beside the real tokenizer, small prepared corpora, train.py runs

# jfk.flac, cut where the speaker pauses (seconds), with the words of each piece
PIECES = [((0.3, 2.6), "And so my fellow Americans,"), ((3.2, 6.7), "ask not what your country can do for you,"),
          ((7.4, 11.0), "ask what you can do for your country.")]
TINY = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1, n_vocab=51864,
            n_text_ctx=64, n_text_state=64, n_text_head=2, n_text_layer=2)


def tiny_model(folder, tiny_en_dir, seed=0, **dims):
    """A random dual Whisper of TINY dimensions saved as one of our folders (with tiny.en's tokenizer)."""
    torch.manual_seed(seed)
    model = dw.Whisper(dw.ModelDimensions(**{**TINY, **dims}))
    model.source_dir = tiny_en_dir
    return dw.save_model(model, folder)


def write_corpus(folder, tokenizer, train_clips, val_clips, noise=()):
    prompt = [tokenizer.sot, tokenizer.no_timestamps]
    for split, clips in (("train", train_clips), ("val", val_clips), ("noise", noise)):
        if split == "noise" and not clips:
            continue
        w = prepare.SplitWriter(folder, split)
        for i, (audio, text) in enumerate(clips):
            tokens = prompt + tokenizer.encode(" " + text.strip()) + [tokenizer.eot] if text else []
            w.add(audio, tokens, {"id": f"{split}-{i}", "text": text})
        w.close()
    return folder


def piece(audio, span):
    a, b = (int(t * dw.SAMPLE_RATE) for t in span)
    return audio[a:b]


@pytest.fixture(scope="session")
def tokenizer(tiny_en_dir):
    return dw.get_tokenizer(tiny_en_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_en_dir):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "model", tiny_en_dir)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, tokenizer, jfk_audio):
    """8 training clips (the three pieces, shifted a little), 2 validation clips, a noise bank."""
    rng = np.random.default_rng(0)
    train_clips = []
    for i in range(8):
        (a, b), text = PIECES[i % 3]
        shift = 0.1 * (i // 3)
        train_clips.append((piece(jfk_audio, (a + shift, b)), text))
    val = [(piece(jfk_audio, span), text) for span, text in PIECES[:2]]
    noise = [(0.1 * rng.standard_normal(5 * dw.SAMPLE_RATE).astype(np.float32), ""),
             (0.1 * dw.coloured_noise((7 * dw.SAMPLE_RATE,), "brown", generator=torch.Generator().manual_seed(1)).numpy(), "")]
    return write_corpus(tmp_path_factory.mktemp("corpus") / "data", tokenizer, train_clips, val, noise)


def run_train(*flags, check=True, env=None, **kw):
    """train.py as a subprocess: (returncode, stdout, stderr)."""
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, flags)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.returncode, p.stdout, p.stderr


def train_main(flags):
    """train.py in this process (faster than a subprocess), with flags of any type."""
    return train.main([str(f) for f in flags])


def abs_diff(a, b):
    """|a - b| over all tensors of two state dicts, flattened into one."""
    return torch.cat([(a[k] - b[k]).abs().flatten() for k in a])


def records(out_dir, event):
    out = []
    for line in (Path(out_dir) / "log.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # the last line of a log being written
            continue
        if r["event"] == event:
            out.append(r)
    return out


def losses(out_dir):
    """{iter: loss}, the last record of each step winning (a resumed run logs its steps again)."""
    return {r["iter"]: r["loss"] for r in records(out_dir, "train")}


def quick(corpus, model_dir, out_dir, *flags):
    """Flags of a short CPU run on the test corpus."""
    return ["--data", corpus, "--init_from", model_dir, "--out_dir", out_dir, "--batch_size", 4, "--eval_samples", 0,
            "--warmup_iters", 0, "--learning_rate", 1e-3, "--freeze", "none", *flags]


