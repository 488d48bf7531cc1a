"""The accelerator paths, on a CUDA GPU where there is one (CI has none, so these skip there: on
a CPU the comparisons against the CPU's numbers would compare the CPU with itself). Transcription on the GPU against
openai-whisper on the same GPU and against our CPU numbers; float16, bfloat16 and the compiled
decoder through sample.py; the CUDA-graph decoding step against the eager one; batching, one long
file in batches; GPU memory over long audio. train.py on the GPU: autocast
with and without a GradScaler, torch.compile, fused AdamW, NCCL under torchrun; log-mel on the
device. Noise mixing on the GPU is test_train's SNR test, which runs on each device there is."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, need
from safetensors.torch import load_file
from conftest import abs_diff, quick, records, run_train, tiny_model
from test_sample import _wav, assert_batched_matches_alone, assert_same_transcript

import dualwhisper as dw

DEVICE = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SR = dw.SAMPLE_RATE
GREEDY, BEAM5 = dict(temperature=0.0), dict(temperature=0.0, beam_size=5)


def sync():
    torch.cuda.synchronize(DEVICE)


@pytest.fixture(scope="module")
def tiny_en_gpu(tiny_en_dir):
    return dw.load_model(tiny_en_dir, device=DEVICE)


# -----------------------------------------------------------------------------
# the front end and the model's numbers on the device


def test_log_mel_on_the_device_is_the_cpu_one(jfk_audio):
    cpu = dw.log_mel_spectrogram(jfk_audio)
    gpu = dw.log_mel_spectrogram(jfk_audio, device=DEVICE)
    assert gpu.device.type == DEVICE.type
    assert (gpu.cpu() - cpu).abs().max() < 1e-4


def test_logits_on_the_device_are_the_cpu_ones(tiny_en, tiny_en_gpu, jfk_audio):
    """float32 on both; the GPU's convolutions may run in TF32 (cuDNN's default), which is the
    whole of the difference, well under what changes a token."""
    tok = dw.get_tokenizer(tiny_en)
    tokens = torch.tensor([list(tok.sot_sequence()) + tok.encode(" And so my fellow Americans, ask not")])
    mel = dw.log_mel_spectrogram(dw.pad_or_trim(jfk_audio))[None]
    with torch.no_grad():
        cpu = tiny_en.logits(tokens, tiny_en.embed_audio(mel))
        gpu = tiny_en_gpu.logits(tokens.to(DEVICE), tiny_en_gpu.embed_audio(mel.to(DEVICE))).cpu()
    rel = float((gpu - cpu).norm() / cpu.norm())
    print(f"logits on {DEVICE} against the CPU: relative error {rel:.2e}")
    assert rel < 2e-3
    assert torch.equal(gpu.argmax(-1), cpu.argmax(-1))


# -----------------------------------------------------------------------------
# transcription on the device


@pytest.mark.parametrize("options", [GREEDY, BEAM5], ids=["greedy", "beam5"])
def test_transcripts_match_openai_whisper_on_the_device(tiny_en_gpu, openai_tiny_en, jfk_audio, long_audio, options):
    whisper = need("whisper")
    ref_model = copy.deepcopy(openai_tiny_en).to(DEVICE)
    for audio in (jfk_audio, long_audio):
        ref = whisper.transcribe(ref_model, audio, fp16=False, **options)
        ours = dw.transcribe(tiny_en_gpu, audio, **options)
        assert_same_transcript(ours, ref)


def test_batched_windows_on_the_device_match_one_file_at_a_time(tiny_en_gpu, jfk_audio, long_audio):
    audios = [long_audio[: 35 * SR], jfk_audio[: 3 * SR], np.zeros(4 * SR, np.float32), long_audio[20 * SR:]]
    alone = assert_batched_matches_alone(tiny_en_gpu, audios, batch_size=3)
    assert alone[2]["text"] == ""


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_gives_the_same_words(tiny_en_dir, tiny_en_gpu, jfk_audio, long_audio, dtype):
    jiwer = need("jiwer")
    model = dw.load_model(tiny_en_dir, device=DEVICE, dtype=dtype)
    assert next(model.parameters()).dtype == dtype
    for name, audio in (("jfk", jfk_audio), ("long", long_audio)):
        ref = dw.normalize_text(dw.transcribe(tiny_en_gpu, audio, **GREEDY)["text"])
        got = dw.normalize_text(dw.transcribe(model, audio, **GREEDY)["text"])
        wer = jiwer.wer(ref, got)
        print(f"{dtype} on {DEVICE}, {name}: WER {wer:.3f} against float32")
        # measured on an H200: float16 0 and 0; bfloat16 (8 bits of mantissa against float16's 11) 0 on
        # jfk and 0.065 on the long file, where one window's words go another way
        assert wer <= (0.0 if name == "jfk" or dtype == torch.float16 else 0.1), (ref, got)


def test_cli_on_the_device_compiled_and_half(tiny_en_dir, tiny_en_gpu, jfk_path, long_audio, tmp_path):
    """sample.py --device: float16 by default there; --compile --dtype float32 gives the tokens of
    the eager float32 decoder, for a batch of two files (greedy both: a window retried at a
    temperature above 0 samples)."""
    long_path = _wav(tmp_path / "long.wav", long_audio)
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_en_dir), "--device", str(DEVICE)]
    p = subprocess.run([*cmd, str(jfk_path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ask not what your country can do for you" in p.stdout
    out = tmp_path / "json"
    p = subprocess.run([*cmd, "--dtype", "float32", "--compile", "--batch_size", "2", "--temperature_increment_on_fallback", "0",
                        "-f", "json", "-o", str(out),
                        str(jfk_path), long_path], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    for path in (jfk_path, long_path):  # the reference decodes the same 16-bit samples the CLI read
        got = json.loads((out / (os.path.splitext(os.path.basename(path))[0] + ".json")).read_text())
        ref = dw.transcribe(tiny_en_gpu, dw.load_audio(path), **GREEDY)
        assert got["text"] == ref["text"]
        assert [s["tokens"] for s in got["segments"]] == [s["tokens"] for s in ref["segments"]]


@pytest.mark.parametrize("options", [GREEDY, BEAM5], ids=["greedy", "beam5"])
def test_cuda_graph_decoding_matches_eager(tiny_en_gpu, jfk_audio, long_audio, options):
    """use_static_decoding on the device (compiled, mode="reduce-overhead": each step one CUDA
    graph replay) gives the eager decoder's text, tokens and segment times, one file at a time
    and for a batch of windows with prompts of different lengths."""
    graphs = dw.use_static_decoding(copy.deepcopy(tiny_en_gpu))
    for audio in (jfk_audio, long_audio):
        ref, got = dw.transcribe(tiny_en_gpu, audio, **options), dw.transcribe(graphs, audio, **options)
        assert got["text"] == ref["text"]
        assert [(s["start"], s["end"], s["tokens"]) for s in got["segments"]] == [(s["start"], s["end"], s["tokens"]) for s in ref["segments"]]
    audios = [long_audio[: 35 * SR], jfk_audio[: 3 * SR]]
    ref = dict(dw.transcribe_many(tiny_en_gpu, audios, batch_size=2, **options))
    got = dict(dw.transcribe_many(graphs, audios, batch_size=2, **options))
    assert all(got[i]["text"] == ref[i]["text"] for i in ref)


def test_one_long_file_in_batches_on_the_device(tiny_en_gpu, tiny_en, long_audio):
    """The chunked mode on the device gives the CPU's words."""
    cpu = dw.transcribe(tiny_en, long_audio, batch_size=4, **GREEDY)
    gpu = dw.transcribe(tiny_en_gpu, long_audio, batch_size=4, **GREEDY)
    assert gpu["text"] == cpu["text"]


def test_device_memory_does_not_grow_with_the_audio(tiny_en_gpu, long_audio):
    """Ten minutes need no more device memory than one: the log-mel of the file stays on the CPU
    and each 30-second window goes to the device when it is decoded."""
    if DEVICE.type != "cuda":
        pytest.skip("device memory is measured on CUDA")

    def peak(audio):
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        dw.transcribe(tiny_en_gpu, audio, **GREEDY)
        sync()
        return torch.cuda.max_memory_allocated(DEVICE) - base

    one, ten = peak(long_audio), peak(np.tile(long_audio, 10))
    print(f"peak device memory above the weights: {one / 2**20:.1f} MiB for 61 s, {ten / 2**20:.1f} MiB for 10 min")
    assert ten < one + 8 * 2**20  # the log-mel of 10 minutes alone would be 19 MiB


# -----------------------------------------------------------------------------
# training on the device


def test_float32_training_step_on_the_device_is_the_cpu_one(tmp_path, corpus, tiny_en_dir):
    """Clean audio (the noise generators differ by device): the first loss and the weights after
    two steps agree with the CPU's, TF32 matmuls allowing."""
    model_dir = tiny_model(tmp_path / "model", tiny_en_dir)
    flags = ["--max_iters", 2, "--eval_interval", 2, "--noise", "none", "--dtype", "float32", "--no-compile"]
    for device, out in (("cpu", "cpu"), (DEVICE.type, "dev")):
        run_train(*quick(corpus, model_dir, tmp_path / out, "--device", device, *flags))
    cpu, gpu = records(tmp_path / "cpu", "train"), records(tmp_path / "dev", "train")
    assert gpu[0]["loss"] == pytest.approx(cpu[0]["loss"], rel=2e-3)
    start = load_file(model_dir / "model.safetensors")
    a, b = load_file(tmp_path / "cpu" / "latest" / "model.safetensors"), load_file(tmp_path / "dev" / "latest" / "model.safetensors")
    diff, moved = abs_diff(a, b), abs_diff(a, start)
    # Adam's step is about the learning rate (1e-3) times the gradient's sign, so an element whose
    # gradient is near 0 may go either way; every other one must agree
    print(f"weights after 2 steps, {DEVICE} against the CPU: mean difference {diff.mean():.2e}, mean step {moved.mean():.2e}")
    assert diff.mean() < moved.mean() / 50 and (diff > moved.mean()).float().mean() < 1e-3


@pytest.mark.parametrize("dtype,compiled", [("bfloat16", True), ("float16", False)])
def test_autocast_and_compile_on_the_device(tmp_path, corpus, tiny_en_dir, dtype, compiled):
    model_dir = tiny_model(tmp_path / "model", tiny_en_dir)
    out = tmp_path / "out"
    run_train(*quick(corpus, model_dir, out, "--device", DEVICE.type, "--dtype", dtype, "--compile" if compiled else "--no-compile",
                     "--max_iters", 6, "--eval_interval", 6, "--eval_samples", 2, "--eval_snr", 5,
                     "--noise", "white:0.3,babble:0.3,talker:0.2,bank:0.2", "--spec_augment"))
    loss = {r["iter"]: r["loss"] for r in records(out, "train")}
    assert len(loss) == 6 and all(np.isfinite(v) for v in loss.values()) and loss[6] < loss[1]
    ev = records(out, "eval")[-1]
    assert ev["iter"] == 6
    assert set(ev["results"]) == {"clean", "babble 5 dB"} and all(np.isfinite(r["wer"]) for r in ev["results"].values())
    state = torch.load(out / "latest" / "state.pt", weights_only=True)
    assert (state["scaler"] != {}) == (dtype == "float16"), "a GradScaler only for float16"
    weights = load_file(out / "latest" / "model.safetensors")
    assert set(weights) == set(load_file(model_dir / "model.safetensors")), "no _orig_mod. or module. prefixes"
    assert all(w.dtype == torch.float32 for w in weights.values()), "float32 master weights"
    dw.load_model(out, device="cpu")  # the run folder loads anywhere


def test_cuda_graphs_training_on_the_device(tmp_path, corpus, tiny_en_dir):
    """--compile_mode reduce-overhead (CUDA graphs), two micro-steps a step: the losses of an eager
    run, and the gate, read from each forward's outputs before the next replay overwrites them."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    model_dir = tiny_model(tmp_path / "model", tiny_en_dir)
    flags = ["--device", DEVICE.type, "--dtype", "bfloat16", "--max_iters", 4, "--eval_interval", 4, "--noise", "none",
             "--gradient_accumulation_steps", 2, "--dual_lr_mult", 30]
    run_train(*quick(corpus, model_dir, tmp_path / "eager", *flags, "--no-compile"))
    run_train(*quick(corpus, model_dir, tmp_path / "graphs", *flags, "--compile", "--compile_mode", "reduce-overhead"))
    eager, graphs = records(tmp_path / "eager", "train"), records(tmp_path / "graphs", "train")
    print("losses, eager:", [r["loss"] for r in eager], "CUDA graphs:", [r["loss"] for r in graphs])
    assert [r["iter"] for r in graphs] == [1, 2, 3, 4]
    for a, b in zip(eager, graphs):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)  # bfloat16, kernels fused differently
    assert graphs[-1]["gate_abs"] > 0 and graphs[-1]["gate_abs"] == pytest.approx(eager[-1]["gate_abs"], rel=0.2)


def test_torchrun_on_the_device(tmp_path, corpus, tiny_en_dir):
    """One rank under torchrun: the process group on NCCL, the evaluation's sums through it."""
    model_dir = tiny_model(tmp_path / "model", tiny_en_dir)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(ROOT / "train.py"),
           *map(str, quick(corpus, model_dir, out, "--device", DEVICE.type, "--max_iters", 2, "--eval_interval", 2, "--eval_samples", 2))]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [r["iter"] for r in records(out, "train")] == [1, 2] and [r["iter"] for r in records(out, "eval")] == [0, 2]
