"""train.py and the noise section of dualwhisper.py, on CPU: noise at the requested SNR, overfitting a
few clips, torchrun DDP against one process, kill-and-resume, autocast and compile, freezing, bad
data and bad settings. Tiny random models keep it fast; real speech comes from jfk.flac."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dualwhisper as dw
import prepare
import train
from conftest import (PIECES, ROOT, TINY, abs_diff, losses, piece, quick, records, run_train, tiny_model,  # noqa: F401
                      train_main, write_corpus)

def test_batches_pad_to_the_longest_text_or_to_multiples_of_8(corpus, tokenizer):
    """Eager steps pay for every padding position; a compiled model sees fewer distinct shapes."""
    split = prepare.PreparedSplit(corpus, "train")
    indices = list(range(4))
    seqs = split.batch(indices)[1]
    longest = max(len(s) for s in seqs) - 1  # inputs are the sequences without their last token
    for multiple, T in ((1, longest), (8, -(-longest // 8) * 8)):
        audio, lengths, x, y, prompts = train.get_batch(split, indices, tokenizer.no_timestamps, tokenizer.eot, 448, torch.device("cpu"), multiple)
        assert x.shape == y.shape == (4, T)
        for b, s in enumerate(seqs):
            assert x[b, :len(s) - 1].tolist() == s[:-1].tolist() and (x[b, len(s) - 1:] == tokenizer.eot).all()
            assert y[b, len(prompts[b]) - 1:len(s) - 1].tolist() == s[len(prompts[b]):].tolist() and (y[b, len(s) - 1:] == -100).all()


# -----------------------------------------------------------------------------
# the loop


def test_overfits_a_few_clips(tmp_path, tiny_en_dir, tokenizer, jfk_audio):
    """Two clips: the loss falls several-fold and greedy decoding of the result gives their words."""
    clips = [(piece(jfk_audio, span), text) for span, text in (PIECES[0], PIECES[2])]
    data = write_corpus(tmp_path / "data", tokenizer, clips, clips)
    model_dir = tiny_model(tmp_path / "model", tiny_en_dir)
    out = tmp_path / "out"
    train_main(["--data", data, "--init_from", model_dir, "--out_dir", out, "--batch_size", 2, "--max_iters", 40,
                "--learning_rate", 3e-3, "--warmup_iters", 5, "--noise", "none", "--freeze", "none", "--dual_lr_mult", 1,
                "--eval_interval", 40, "--eval_samples", 2, "--eval_snr"])
    loss = losses(out)
    assert loss[40] < loss[1] / 5 and loss[35] < loss[5] / 5, loss
    model = dw.load_model(out)  # a run folder: its best checkpoint
    assert model.source_dir == out / "best"
    mel = dw.log_mel_spectrogram(torch.stack([torch.from_numpy(dw.pad_or_trim(a)) for a, _ in clips]))
    got = [tokenizer.decode(t).strip() for t in dw.greedy_decode(model, mel, tokenizer)]
    assert got == [text for _, text in clips]
    evals = records(out, "eval")
    # the evaluation transcribes as sample.py does, each window's log-mel padded with zeros (openai-whisper's
    # input), not the log-mel of padded audio that training sees: a tiny overfit model is not exact there
    assert evals[0]["results"]["clean"]["wer"] > 0.5 and evals[-1]["results"]["clean"]["wer"] < evals[0]["results"]["clean"]["wer"]


def test_ddp_two_ranks_match_one_process(tmp_path, corpus, tiny_dir):
    """torchrun with 2 gloo ranks: both end bit-identical, and match one process with the same global
    batch; the evaluation, each rank on its share of the clips, matches one process's too."""
    flags = ["--max_iters", 3, "--eval_interval", 3, "--noise", "white:0.3,babble:0.3,talker:0.2,bank:0.2", "--eval_samples", 2]
    run_train(*quick(corpus, tiny_dir, tmp_path / "one", *flags))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *map(str, quick(corpus, tiny_dir, tmp_path / "two", *flags))]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    check, = records(tmp_path / "two", "ddp_check")
    assert check["ranks_identical"] and len(check["digests"]) == 2
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3}
    for it in one:
        assert one[it] == pytest.approx(two[it], rel=1e-4)
    evals = [records(tmp_path / run, "eval") for run in ("one", "two")]
    assert [e["iter"] for e in evals[0]] == [e["iter"] for e in evals[1]] == [0, 3]
    for a, b in zip(*evals):
        assert a["results"].keys() == b["results"].keys() == {"clean", "babble 5 dB"}
        for cond in a["results"]:
            ra, rb = a["results"][cond], b["results"][cond]
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4) and ra["words"] == rb["words"] > 0, (cond, ra, rb)
            assert ra["wer"] == pytest.approx(rb["wer"], abs=1e-9) and ra["cer"] == pytest.approx(rb["cer"], abs=1e-9), (cond, ra, rb)
    a, b = load_file(tmp_path / "one" / "latest" / "model.safetensors"), load_file(tmp_path / "two" / "latest" / "model.safetensors")
    start = load_file(tiny_dir / "model.safetensors")
    assert a.keys() == b.keys() == start.keys()
    # the same up to summation order, which Adam may amplify on the odd element whose gradient is near 0;
    # a different batch or loss scale would move every parameter by about the learning rate (1e-3) instead
    diff, moved = abs_diff(a, b), abs_diff(a, start)
    assert diff.max() < 1e-4 and diff.mean() < 1e-7, (diff.max(), diff.mean())
    assert moved.mean() > 1e-4, "training must have changed the parameters"


def test_gradient_checkpointing_and_accumulation_give_the_same_steps(tmp_path, corpus, tiny_dir):
    """Recomputing activations in the backward pass, or splitting the batch into micro-steps,
    changes how the gradient is computed, not what it is."""
    flags = ["--max_iters", 3, "--noise", "white:0.5,babble:0.3", "--spec_augment"]
    runs = {name: tmp_path / name for name in ("plain", "checkpointing", "accumulation")}
    train_main(quick(corpus, tiny_dir, runs["plain"], *flags))
    train_main(quick(corpus, tiny_dir, runs["checkpointing"], *flags, "--gradient_checkpointing"))
    train_main(quick(corpus, tiny_dir, runs["accumulation"], *flags, "--gradient_accumulation_steps", 2))
    def steps(out):  # (loss, gradient norm before clipping) of each step: Adam alone would hide a gradient off by a factor
        return {r["iter"]: (r["loss"], r["grad_norm"]) for r in records(out, "train")}

    ref = steps(runs["plain"])
    assert set(ref) == {1, 2, 3}
    for name in ("checkpointing", "accumulation"):
        got = steps(runs[name])
        assert got.keys() == ref.keys() and all(got[i] == pytest.approx(ref[i], rel=1e-5) for i in ref), (name, got, ref)
        a, b = load_file(runs["plain"] / "latest" / "model.safetensors"), load_file(runs[name] / "latest" / "model.safetensors")
        diff = abs_diff(a, b)
        assert diff.max() < 1e-4 and diff.mean() < 1e-7, (name, diff.max(), diff.mean())


def test_resume_after_kill_reproduces_the_losses(tmp_path, corpus, tiny_dir):
    flags = ["--max_iters", 8, "--eval_interval", 3, "--log_interval", 1, "--spec_augment"]
    run_train(*quick(corpus, tiny_dir, tmp_path / "whole", *flags))
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, quick(corpus, tiny_dir, out, *flags))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill it once it has saved step 3 and gone on
        if (out / "log.jsonl").exists() and any(r["iter"] >= 4 for r in records(out, "train")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(losses(out))
    assert 4 <= done < 8, "the run should have been killed between a checkpoint and the end"
    run_train(*quick(corpus, tiny_dir, out, *flags), "--resume")
    whole, resumed = losses(tmp_path / "whole"), losses(out)
    assert whole.keys() == resumed.keys() == set(range(1, 9))
    for it in range(1, 9):
        assert resumed[it] == pytest.approx(whole[it], rel=1e-6), it
    restarts = [r for r in records(out, "config") if r["resume_from"]]
    assert len(restarts) == 1 and restarts[0]["resume_from"].endswith("latest")
    a, b = load_file(tmp_path / "whole" / "latest" / "model.safetensors"), load_file(out / "latest" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in b)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_autocast_paths(tmp_path, corpus, tiny_en_dir, dtype):
    model_dir = tiny_model(tmp_path / "model", tiny_en_dir, n_audio_state=32, n_text_state=32, n_text_layer=1)
    out = tmp_path / "out"
    train_main(quick(corpus, model_dir, out, "--max_iters", 2, "--batch_size", 1, "--dtype", dtype, "--noise", "none",
                     "--freeze", "encoder", "--eval_interval", 2))
    loss = losses(out)
    assert all(np.isfinite(v) for v in loss.values()) and len(loss) == 2
    cfg = json.loads((out / "latest" / "config.json").read_text())
    assert cfg["train_config"]["dtype"] == dtype
    state = torch.load(out / "latest" / "state.pt", weights_only=True)
    assert (state["scaler"] != {}) == (dtype == "float16"), "a GradScaler only for float16"


def test_compiled_path(tmp_path, corpus, tiny_en_dir):
    from torch._dynamo.utils import counters

    model_dir = tiny_model(tmp_path / "model", tiny_en_dir, n_audio_state=32, n_text_state=32, n_text_layer=1)
    out = tmp_path / "out"
    flags = ["--max_iters", 1, "--batch_size", 2, "--noise", "white:0.5", "--eval_interval", 1]
    counters.clear()
    train_main(quick(corpus, model_dir, out, "--compile", *flags))
    assert counters["stats"]["unique_graphs"] > 0, "the model must have gone through torch.compile"
    # a graph break splits the model into pieces compiled one by one: whisper-small then trained
    # at a seventh of its speed on a GPU, when Linear asked for the thread count
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    train_main(quick(corpus, model_dir, tmp_path / "eager", *flags))
    assert losses(out)[1] == pytest.approx(losses(tmp_path / "eager")[1], rel=1e-4)
    state = load_file(out / "latest" / "model.safetensors")
    assert set(state) == set(load_file(model_dir / "model.safetensors")), "no _orig_mod. prefixes"
    assert records(out, "train")[0]["gate"] is not None


@pytest.mark.parametrize("freeze", ["encoder", "base"])
def test_frozen_parts_stay_bit_identical(tmp_path, corpus, tiny_dir, freeze):
    out = tmp_path / "out"
    train_main(quick(corpus, tiny_dir, out, "--max_iters", 2, "--freeze", freeze, "--eval_interval", 2, "--weight_decay", 0.1))
    start, end = load_file(tiny_dir / "model.safetensors"), load_file(out / "latest" / "model.safetensors")
    for k in start:
        frozen = k.startswith("encoder.") or (freeze == "base" and not dw.is_dual_parameter(k))
        if frozen:
            assert torch.equal(start[k], end[k]), k
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert any(dw.is_dual_parameter(k) for k in changed)
    assert (freeze == "encoder") == any(k.startswith("decoder.") and not dw.is_dual_parameter(k) for k in changed)


def poison(monkeypatch, bad_calls):
    """Make the training loss (Whisper.forward with targets) NaN on the given calls (1-based; one call per micro-step)."""
    real, calls = dw.Whisper.forward, []

    def forward(self, mel, tokens, targets=None, reduction="mean"):
        if targets is None:
            return real(self, mel, tokens)
        calls.append(1)
        return real(self, mel, tokens, targets, reduction) * (float("nan") if bad_calls(len(calls)) else 1.0)

    monkeypatch.setattr(dw.Whisper, "forward", forward)


def test_non_finite_loss_skips_the_step(tmp_path, corpus, tiny_dir, monkeypatch):
    train_main(quick(corpus, tiny_dir, tmp_path / "one", "--max_iters", 1, "--eval_interval", 1))
    poison(monkeypatch, lambda call: call == 2)
    train_main(quick(corpus, tiny_dir, tmp_path / "two", "--max_iters", 2, "--eval_interval", 2))
    assert [r["iter"] for r in records(tmp_path / "two", "skip")] == [2]
    assert records(tmp_path / "two", "train")[-1]["skipped"] == 1
    one, two = load_file(tmp_path / "one" / "latest" / "model.safetensors"), load_file(tmp_path / "two" / "latest" / "model.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one), "a skipped step must leave the weights alone"
    s1 = torch.load(tmp_path / "one" / "latest" / "state.pt", weights_only=True)["optimizer"]["state"]
    s2 = torch.load(tmp_path / "two" / "latest" / "state.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1), "and the optimizer state too"


def test_a_run_of_non_finite_losses_stops_clearly(tmp_path, corpus, tiny_dir, monkeypatch, capsys):
    poison(monkeypatch, lambda call: call >= 3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_main(quick(corpus, tiny_dir, out, "--max_iters", 20, "--eval_interval", 2, "--max_bad_steps", 3))
    assert e.value.code == 3
    assert [r["iter"] for r in records(out, "skip")] == [3, 4, 5]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 non-finite losses in a row at step 5" in err[0] and "latest" in err[0]
    assert json.loads((out / "latest" / "config.json").read_text())["iter_num"] == 4  # saved after the skipped steps 3, 4: still good
    dw.load_model(out)


def test_bad_clips_are_left_out(tmp_path, tiny_dir, tokenizer, jfk_audio, capsys):
    good = [(piece(jfk_audio, span), text) for span, text in PIECES]
    data = write_corpus(tmp_path / "data", tokenizer, good, good[:1])
    w = prepare.SplitWriter(tmp_path / "bad", "train")  # the same clips plus broken ones
    prompt = [tokenizer.sot, tokenizer.no_timestamps]
    for i, (audio, text) in enumerate(good):
        w.add(audio, prompt + tokenizer.encode(" " + text) + [tokenizer.eot], {"id": str(i), "text": text})
    w.add(np.zeros(0, np.float32), prompt + [tokenizer.eot], {"id": "empty", "text": ""})
    w.add(good[0][0], prompt + [60000, tokenizer.eot], {"id": "beyond", "text": "?"})
    w.add(good[0][0], prompt + [13] * 100 + [tokenizer.eot], {"id": "long", "text": "..."})
    w.close()
    for name in ("val.audio.bin", "val.tokens.bin", "val.index.npy", "val.jsonl"):
        (tmp_path / "bad" / name).write_bytes((Path(data) / name).read_bytes())
    out = tmp_path / "out"
    train_main(quick(tmp_path / "bad", tiny_dir, out, "--max_iters", 3, "--batch_size", 3, "--noise", "none", "--eval_interval", 3))
    text = capsys.readouterr().out
    assert "train 3 clips" in text and "'empty audio': 1" in text and "'token ids beyond the vocabulary': 1" in text
    assert "'more tokens than n_text_ctx': 1" in text
    assert len(losses(out)) == 3


def test_a_clip_that_fails_to_read_is_replaced(tmp_path, corpus, tiny_dir, monkeypatch):
    real = prepare.PreparedSplit.batch

    def batch(self, indices, *args, **kwargs):
        if self.split == "train" and 2 in list(indices):
            raise OSError("Input/output error")
        return real(self, indices, *args, **kwargs)

    monkeypatch.setattr(prepare.PreparedSplit, "batch", batch)
    out = tmp_path / "out"
    train_main(quick(corpus, tiny_dir, out, "--max_iters", 4, "--eval_interval", 4, "--noise", "none"))
    bad, = records(out, "bad_clip")
    assert bad["index"] == 2 and "Input/output error" in bad["error"]
    assert len(losses(out)) == 4 and all(np.isfinite(v) for v in losses(out).values())


def test_bad_settings_fail_in_one_line(tmp_path, corpus, tiny_dir, capsys):
    cases = [(["--data", tmp_path / "nowhere"], "no prepared split"),
             (["--batch_size", 3, "--gradient_accumulation_steps", 2], "must be a multiple of"),
             (["--noise", "rain:0.5"], "unknown kind 'rain'"),
             (["--freeze", "wheels"], "unknown part 'wheels'"),
             (["--init_from", tmp_path / "missing"], "not found"),
             (["--resume"], "no checkpoint"),
             (["--plain", "--freeze", "base"], "nothing to train"),
             (["--learning_rate", -1], "--learning_rate must not be negative"),
             (["--weight_decay", "nan"], "--weight_decay must not be negative"),
             (["--beta2", 1], "--beta2 must lie in [0, 1)"),
             (["--device", "cuda:7"], "device cuda:7: ")]
    for extra, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            train_main(quick(corpus, tiny_dir, tmp_path / "out", "--max_iters", 1, *extra))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and err.startswith("train.py: error: ") and message in err, (extra, err)
    # as a command: one line on stderr, a non-zero status; and a finished run is never overwritten by a fresh one
    run_train(*quick(corpus, tiny_dir, tmp_path / "done", "--max_iters", 1, "--eval_interval", 1))
    before = (tmp_path / "done" / "latest" / "model.safetensors").read_bytes()
    code, _, err = run_train(*quick(corpus, tiny_dir, tmp_path / "done", "--max_iters", 1), check=False)
    assert code != 0 and err.strip().count("\n") == 0 and "already holds a run" in err
    assert (tmp_path / "done" / "latest" / "model.safetensors").read_bytes() == before


def test_training_without_a_validation_split(tmp_path, corpus, tiny_dir, capsys):
    """--eval_samples 0 needs no val split; evaluating with an empty one fails in one line."""
    data = tmp_path / "data"
    data.mkdir()
    for f in Path(corpus).iterdir():
        if f.name.startswith(("train.", "noise.")):
            (data / f.name).write_bytes(f.read_bytes())
    _, out, _ = run_train(*quick(data, tiny_dir, tmp_path / "out", "--max_iters", 1))
    assert (tmp_path / "out" / "latest").is_dir() and not (tmp_path / "out" / "best").exists()
    assert f"done: {tmp_path / 'out' / 'latest'};" in out  # no best/ claimed
    prepare.SplitWriter(data, "val").close()  # an empty val split
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_main(quick(data, tiny_dir, tmp_path / "out2", "--max_iters", 1, "--eval_samples", 4))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "split val has no usable clips (it is empty)" in err and "--eval_samples 0" in err


def test_config_file_and_resume_defaults(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('max_iters = 7\nsnr_db = [1, 2]\nnoise = "white:1"\n')
    args = train.resolve(train.parse_config(["--config", str(cfg), "--max_iters", "9"]))
    assert args.max_iters == 9 and args.snr_db == [1.0, 2.0] and args.noise == "white:1"
    cfg.write_text('max_iter = 7\n')
    with pytest.raises(train.TrainError, match="unknown setting 'max_iter'"):
        train.parse_config(["--config", str(cfg)])


def test_plain_baseline_and_the_progress_lines(tmp_path, corpus, tiny_dir, capsys):
    """--plain trains single-cross-attention Whisper with the same loop and saves it as such; one
    progress line per step with loss, lr, grad norm, gate (dual only), samples/s and ETA."""
    number = r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?"
    for plain in (True, False):
        out = tmp_path / ("plain" if plain else "dual")
        capsys.readouterr()
        train_main(quick(corpus, tiny_dir, out, "--max_iters", 2, *(["--plain"] if plain else [])))
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
        gate = "" if plain else rf", gate {number} \(\|g\| {number}\)"
        assert len(lines) == 2 and all(re.fullmatch(rf"step {i}/2: loss {number}, lr {number}, grad norm {number}{gate}, "
                                                     rf"{number} samples/s, eta {number} min", line) for i, line in enumerate(lines, 1)), lines
        keys = set(load_file(out / "latest" / "model.safetensors"))
        assert any(dw.is_dual_parameter(k) for k in keys) != plain
        model = dw.load_model(out)
        assert model.dims.dual != plain and len(losses(out)) == 2


def test_optimizer_groups_decay_and_learning_rates(tiny_dir):
    """Only linear and conv weights decay (never norms, biases, embeddings or the gate); the new parts get
    dual_lr_mult; frozen parts are left out."""
    model = dw.load_model(tiny_dir)
    expect = {"encoder.conv1.weight": (0.1, 1.0), "encoder.blocks.0.mlp.0.weight": (0.1, 1.0), "encoder.blocks.0.mlp.0.bias": (0.0, 1.0),
              "decoder.blocks.0.attn_ln.weight": (0.0, 1.0), "decoder.token_embedding.weight": (0.0, 1.0),
              "decoder.positional_embedding": (0.0, 1.0), "decoder.blocks.0.cross_attn.key.weight": (0.1, 1.0),
              "decoder.blocks.0.cross_attn2.query.weight": (0.1, 3.0), "decoder.blocks.0.cross_attn2.query.bias": (0.0, 3.0),
              "decoder.blocks.0.cross_attn2_ln.weight": (0.0, 3.0), "decoder.blocks.0.gate.weight": (0.0, 3.0)}
    for freeze in ("none", "encoder"):
        args = train.resolve(train.parse_config(["--weight_decay", "0.1", "--dual_lr_mult", "3", "--freeze", freeze, "--device", "cpu"]))
        for name, p in model.named_parameters():
            p.requires_grad_(not (name.startswith("encoder.") and freeze == "encoder"))
        groups = {n: (g["weight_decay"], g["lr_mult"]) for g in train.configure_optimizer(model, args, "cpu").param_groups
                  for n, p in model.named_parameters() if any(p is q for q in g["params"])}
        assert set(groups) == {n for n, p in model.named_parameters() if p.requires_grad}
        for name, want in expect.items():
            assert groups.get(name) == (None if freeze == "encoder" and name.startswith("encoder.") else want), (freeze, name)


def test_learning_rate_schedule():
    args = train.resolve(train.parse_config(["--learning_rate", "1e-3", "--warmup_iters", "10", "--max_iters", "110"]))
    lrs = [train.get_lr(i, args) for i in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[110] == lrs[119] == pytest.approx(1e-4)


# -----------------------------------------------------------------------------
# packing (--pack): short clips filled into 30-second windows, Whisper's timestamped targets


def packing_corpus(folder, tokenizer, clips, seed=0):
    """A train split of clips (seconds, language, text) of quiet noise, with multilingual prompts;
    four speakers, and every seventh clip without one."""
    rng = np.random.default_rng(seed)
    w = prepare.SplitWriter(folder, "train")
    for i, (seconds, language, text) in enumerate(clips):
        prompt = tokenizer.sot_sequence(language, "transcribe") + [tokenizer.no_timestamps]
        audio = 0.1 * rng.standard_normal(int(seconds * dw.SAMPLE_RATE)).astype(np.float32)
        row = {"id": str(i), "text": text, "language": language, **({"speaker": f"s{i % 4}"} if i % 7 else {})}
        w.add(audio, prompt + tokenizer.encode(" " + text) + [tokenizer.eot], row)
    w.close()
    return prepare.PreparedSplit(folder, "train")


@pytest.fixture(scope="module")
def two_languages(tmp_path_factory, multilingual_tokenizer_dir):
    """50 clips of 1 to 6 s (two of 14 and 25 s), in English and Azerbaijani."""
    tokenizer = dw.Tokenizer.from_pretrained(multilingual_tokenizer_dir)
    rng = np.random.default_rng(1)
    clips = [(float(rng.uniform(1, 6)), "en" if i % 3 else "az", f"clip number {i} says {'word ' * int(rng.integers(1, 12))}")
             for i in range(48)] + [(14.0, "en", "a long one"), (25.0, "az", "a longer one")]
    return tokenizer, packing_corpus(tmp_path_factory.mktemp("two_languages") / "data", tokenizer, clips)


def parse_timestamped(tokenizer, tokens):
    """[(start, text tokens, end)] of a target in Whisper's timestamped format; fails on any other shape."""
    segments, i, ts = [], 0, tokenizer.timestamp_begin
    while tokens[i] != tokenizer.eot:
        assert tokens[i] >= ts, f"a segment must open with a timestamp: {tokenizer.decode_with_timestamps(tokens)}"
        j = i + 1
        while tokens[j] < tokenizer.eot:
            j += 1
        assert tokens[j] >= ts, f"a segment must close with a timestamp: {tokenizer.decode_with_timestamps(tokens)}"
        segments.append(((tokens[i] - ts) * 0.02, tokens[i + 1:j], (tokens[j] - ts) * 0.02))
        i = j + 1
    assert i == len(tokens) - 1, "nothing after <|endoftext|>"
    return segments


def test_packed_epoch_holds_every_clip_once(two_languages):
    """Every usable clip once per epoch, in stream order within its language, windows of one language
    that fit 30 s and the text context; a clip that does not fit opens its language's next window."""
    tokenizer, split = two_languages
    clips = np.array([c for c in range(len(split)) if c != 7])  # a clip left out (as usable_clips leaves out bad ones)
    n_text_ctx = 60  # small, so that some windows close on tokens rather than on seconds
    packed = train.PackedStream(split, clips, seed=3, no_timestamps=tokenizer.no_timestamps, n_text_ctx=n_text_ctx)
    k, closed_on = 0, set()
    for epoch in range(3):
        order = [packed.stream[p] for p in range(epoch * len(clips), (epoch + 1) * len(clips))]
        windows = []
        while sum(len(w[2]) for w in windows) < len(clips):
            windows.append(packed[k])
            k += 1
        seen = [c for w in windows for c, _ in w[2]]
        assert sorted(seen) == sorted(clips.tolist()), f"epoch {epoch}: a clip lost or repeated"
        assert packed.counts[epoch] == len(windows)
        for key, prompt, members in windows:
            assert order[key - epoch * len(clips)] == members[0][0], "a window's key is the stream position of its first clip"
            assert {tuple(split.tokens(c)[:len(prompt)].tolist()) for c, _ in members} == {prompt}, "one language per window"
            positions = [order.index(c) for c, _ in members]
            same = [i for i, c in enumerate(order) if tuple(split.tokens(c)[:len(prompt)].tolist()) == prompt]
            assert positions == same[same.index(positions[0]):][:len(positions)], "consecutive clips of its language, in stream order"
            end, tokens = 0, len(prompt)
            for c, offset in members:
                assert offset >= end and offset % train.TIMESTAMP_SAMPLES == 0
                end, tokens = offset + int(split.lengths[c]), tokens + packed.n_text[c] + 2
            assert end <= dw.N_SAMPLES and tokens <= n_text_ctx + 1
            nxt = same[same.index(positions[-1]) + 1] if same.index(positions[-1]) + 1 < len(same) else None
            if nxt is not None:  # the next clip of this language did not fit: it opens the next window
                c = order[nxt]
                gap = packed.gaps(epoch)[nxt]
                too_long = -(-end // train.TIMESTAMP_SAMPLES) * train.TIMESTAMP_SAMPLES + gap + int(split.lengths[c]) > dw.N_SAMPLES
                assert too_long or tokens + packed.n_text[c] + 2 > n_text_ctx + 1
                closed_on.add("seconds" if too_long else "tokens")
    assert closed_on == {"seconds", "tokens"}, closed_on
    again = train.PackedStream(split, clips, seed=3, no_timestamps=tokenizer.no_timestamps, n_text_ctx=n_text_ctx)
    assert [again[i] for i in reversed(range(k))][::-1] == [packed[i] for i in range(k)], "windows depend on the seed alone"
    other = train.PackedStream(split, clips, seed=4, no_timestamps=tokenizer.no_timestamps, n_text_ctx=n_text_ctx)
    assert [other[i] for i in range(5)] != [packed[i] for i in range(5)]
    # --pack_clips 2: the same clips in the same order, windows of at most two
    pairs = train.PackedStream(split, clips, seed=3, no_timestamps=tokenizer.no_timestamps, n_text_ctx=n_text_ctx, max_clips=2)
    first = pairs.pack_epoch(0)
    assert max(len(w[2]) for w in first) == 2 and sorted(c for w in first for c, _ in w[2]) == sorted(clips.tolist())
    assert len(first) > packed.counts[0]
    # --pack_lead 0 0: a window's first clip at 0 s, the others after their gaps
    lead0 = train.PackedStream(split, clips, seed=3, no_timestamps=tokenizer.no_timestamps, n_text_ctx=n_text_ctx, lead=(0.0, 0.0))
    windows = lead0.pack_epoch(0)
    assert all(w[2][0][1] == 0 for w in windows) and all(offset > 0 for w in windows for _, offset in w[2][1:])
    assert any(w[2][0][1] > 0 for w in packed.pack_epoch(0)), "by default a window opens with a gap too"
    assert sorted(c for w in windows for c, _ in w[2]) == sorted(clips.tolist())
    half = train.PackedStream(split, clips, seed=3, no_timestamps=tokenizer.no_timestamps, n_text_ctx=n_text_ctx, lead=(-1.0, 1.0))
    at_zero = np.mean([w[2][0][1] == 0 for w in half.pack_epoch(0)])
    assert 0.3 < at_zero < 0.7, "--pack_lead -1 1: about half of the windows start at 0 s"
    # --pack_alone 0.3 (by speaker, whose windows fill slowest): about 3 clips in 10 fill a window alone at 0 s; every
    # clip still once, the others packed as before
    alone = train.PackedStream(split, clips, seed=3, no_timestamps=tokenizer.no_timestamps, n_text_ctx=n_text_ctx, alone=0.3, by_speaker=True)
    windows = alone.pack_epoch(0)
    singles = [w for w in windows if len(w[2]) == 1 and w[2][0][1] == 0]
    assert 0.2 < len(singles) / len(clips) < 0.4
    assert sorted(c for w in windows for c, _ in w[2]) == sorted(clips.tolist())
    assert all(alone.stream[w[0]] == w[2][0][0] for w in singles), "a window's key is its first clip's stream position"
    rest = [w for w in windows if w not in singles]
    assert max(len(w[2]) for w in rest) > 1 and len(windows) > packed.counts[0]
    # spaced out: the windows that hold the first half of the clips hold about the share alone, not all the alone clips first
    seen, first_half = 0, []
    while seen < len(clips) // 2:
        first_half.append(windows[len(first_half)])
        seen += len(first_half[-1][2])
    assert 0.2 < sum(w in singles for w in first_half) / seen < 0.4


def test_packed_by_speaker_holds_one_speaker_a_window(two_languages):
    """--pack_by speaker: a window holds clips of one language and one speaker (clips without a
    speaker go by language), in stream order within that group, every clip once an epoch."""
    tokenizer, split = two_languages
    clips = np.arange(len(split))
    packed = train.PackedStream(split, clips, seed=2, no_timestamps=tokenizer.no_timestamps, by_speaker=True)
    order = [packed.stream[p] for p in range(len(clips))]
    group = {c: (tuple(split.tokens(c)[:3].tolist()), split.row(c).get("speaker")) for c in clips.tolist()}
    windows = packed.pack_epoch(0)
    assert sorted(c for w in windows for c, _ in w[2]) == clips.tolist()
    speakers = set()
    for _, _, members in windows:
        assert len({group[c] for c, _ in members}) == 1, "one language and speaker a window"
        same = [c for c in order if group[c] == group[members[0][0]]]
        at = same.index(members[0][0])
        assert [c for c, _ in members] == same[at:at + len(members)], "consecutive clips of the group, in stream order"
        speakers.add(group[members[0][0]][1])
    assert None in speakers and len(speakers) == 5
    by_language = train.PackedStream(split, clips, seed=2, no_timestamps=tokenizer.no_timestamps).pack_epoch(0)
    assert any(len({group[c][1] for c, _ in w[2]}) > 1 for w in by_language), "by default speakers share windows"


def test_packed_window_target_decodes_back_to_its_clips(two_languages):
    """Timestamped windows: each clip's text between its start and end, in order, inside the window,
    the audio at those times; the others: <|notimestamps|> and the texts alone; about the share asked."""
    tokenizer, split = two_languages
    packed = train.PackedStream(split, np.arange(len(split)), seed=0, no_timestamps=tokenizer.no_timestamps)
    windows = [packed[k] for k in range(40)]
    formats = []
    for share in (0.0, 1.0, 0.5):
        audio, spans, x, y, prompts = train.window_batch(split, windows, tokenizer, 448, torch.device("cpu"), seed=5, no_timestamps_share=share)
        assert audio.shape == (len(windows), dw.N_SAMPLES) and audio.dtype == torch.int16
        for b, (key, prompt, members) in enumerate(windows):
            target = y[b][y[b] != -100].tolist()
            assert x[b, :len(prompts[b])].tolist() == list(prompts[b]) and x[b, len(prompts[b]):len(prompts[b]) + len(target) - 1].tolist() == target[:-1]
            texts = [split.tokens(c)[len(prompt):-1].tolist() for c, _ in members]
            timestamped = tokenizer.no_timestamps not in prompts[b]
            assert list(prompts[b]) == (list(prompt[:-1]) if timestamped else list(prompt))
            if timestamped:
                segments = parse_timestamped(tokenizer, target)
                assert [t for _, t, _ in segments] == texts
                previous_end = 0.0
                for (start, _, end), (c, offset) in zip(segments, members):
                    assert previous_end <= start < end <= 30.0
                    assert start == pytest.approx(offset / dw.SAMPLE_RATE, abs=1e-9)
                    assert end == pytest.approx((offset + split.lengths[c]) / dw.SAMPLE_RATE, abs=0.0101)
                    previous_end = end
            else:
                assert target == [t for text in texts for t in text] + [tokenizer.eot]
            formats.append((share, timestamped))
            expected = np.zeros(dw.N_SAMPLES, dtype=np.int16)
            for c, offset in members:
                expected[offset:offset + split.lengths[c]] = split.audio(c)
            assert np.array_equal(audio[b].numpy(), expected), "each clip at its offset, silence between"
            assert spans[b] == [(offset, offset + int(split.lengths[c])) for c, offset in members]
    assert all(t for s, t in formats if s == 0.0) and not any(t for s, t in formats if s == 1.0)
    assert 0.25 < np.mean([t for s, t in formats if s == 0.5]) < 0.75


@pytest.mark.parametrize("kind", dw.NOISE_KINDS)
def test_packed_noise_fills_the_window_at_the_snr_of_its_clips(kind, corpus):
    """The noise covers the whole window, silence between clips included; the SNR asked for is
    measured over the clips; babble and talkers never come from the window's own clips."""
    pool, bank = prepare.PreparedSplit(corpus, "train"), prepare.PreparedSplit(corpus, "noise")
    members = [(0, 8000), (3, 200000)]
    audio = torch.zeros(1, dw.N_SAMPLES)
    spans = [[(offset, offset + int(pool.lengths[c])) for c, offset in members]]
    for (c, offset), (a, b) in zip(members, spans[0]):
        audio[0, a:b] = torch.from_numpy(pool.audio(c).astype(np.float32) / 32768)
    speech = torch.zeros(dw.N_SAMPLES, dtype=torch.bool)
    for a, b in spans[0]:
        speech[a:b] = True
    mixer = dw.NoiseMixer.fixed(kind, 5.0, bank=bank, pool=pool)
    for key in range(3):
        noisy = mixer(audio, [dw.N_SAMPLES], [key], exclude=[[0, 3]], spans=spans)
        added = (noisy - audio)[0]
        snr = 10 * np.log10(float(audio[0][speech].double().pow(2).sum() / added[speech].double().pow(2).sum()))
        assert abs(snr - 5.0) < 0.5, (kind, key, snr)
        if kind != "talker":
            assert added[~speech].abs().mean() > 0.1 * added[speech].abs().mean(), "noise between the clips too"
        recipe = mixer.draw(key, dw.N_SAMPLES, exclude=[0, 3], spans=spans[0])
        others = [j for j, _ in recipe["pieces"]] if kind in ("babble", "talker") else []
        assert not {0, 3} & set(others)
        if kind == "talker":  # one other talker per clip, starting in its first half
            assert len(recipe["pieces"]) == 2 and all(a <= s < a + (b - a) // 2 for (_, s), (a, b) in zip(recipe["pieces"], spans[0]))
    mel = train.log_mel((audio * 32768).round().short(), None, 80, None, keys=[1], spec_augment=True, spans=spans)
    clean = dw.log_mel_spectrogram(audio, 80)
    # --pack_noise clip: each clip its own draw (kind, SNR), over it and the silence before it
    mixer = dw.NoiseMixer({"white": 0.5, "pink": 0.5}, snr_db=(0.0, 20.0), seed=3)
    added = (train.mix_per_clip(mixer, audio, [7], [[0, 3]], spans) - audio)[0]
    pieces = [(0, spans[0][0][1]), (spans[0][0][1], dw.N_SAMPLES)]
    for i, ((a, b), (start, end)) in enumerate(zip(spans[0], pieces)):
        want = mixer.draw((7, i), end - start)["snr_db"]
        snr = 10 * np.log10(float(audio[0, a:b].double().pow(2).sum() / added[a:b].double().pow(2).sum()))
        assert abs(snr - want) < 0.1 and added[start:a].abs().mean() > 0.1 * added[a:b].abs().mean(), (i, snr, want)
    assert mixer.draw((7, 0), 1)["snr_db"] != mixer.draw((7, 1), 1)["snr_db"]
    # --pack_noise span: the same draws over each clip alone, the silence left silent
    added = (train.mix_per_clip(mixer, audio, [7], [[0, 3]], spans, fill=False) - audio)[0]
    for i, (a, b) in enumerate(spans[0]):
        want = mixer.draw((7, i), b - a)["snr_db"]
        snr = 10 * np.log10(float(audio[0, a:b].double().pow(2).sum() / added[a:b].double().pow(2).sum()))
        assert abs(snr - want) < 0.1, (i, snr, want)
    assert not added[~speech].any(), "no noise outside the clips"
    changed = (mel != clean).any(dim=1)[0]
    assert changed.any() and not changed[(spans[0][-1][1] + dw.HOP_LENGTH - 1) // dw.HOP_LENGTH + 1:].any(), "SpecAugment up to the last clip"


def test_packed_training_resumes_mid_epoch_exactly(tmp_path, tokenizer, jfk_audio, tiny_dir):
    """Stopped after 2 of 6 steps, in the middle of an epoch of windows, and resumed: the same
    losses, gradient norms and weights as the run that went through."""
    clips = [(piece(jfk_audio, (a + 0.05 * (i // 3), b)), text) for i, ((a, b), text) in enumerate(PIECES * 10)]
    data = write_corpus(tmp_path / "data", tokenizer, clips, clips[:2], [(0.1 * np.random.default_rng(0).standard_normal(80000).astype(np.float32), "")])
    flags = ["--pack", "--batch_size", 1, "--lr_decay_iters", 6, "--eval_interval", 6, "--spec_augment"]
    train_main(quick(data, tiny_dir, tmp_path / "whole", *flags, "--max_iters", 6))
    train_main(quick(data, tiny_dir, tmp_path / "stopped", *flags, "--max_iters", 2))
    state = torch.load(tmp_path / "stopped" / "latest" / "state.pt", weights_only=True)
    packed = train.PackedStream(prepare.PreparedSplit(data, "train"), np.arange(len(clips)), 1337, no_timestamps=tokenizer.no_timestamps)
    packed[0]  # packs epoch 0: counts[0] is its number of windows
    assert state["position"] == 2 < packed.counts[0], "the stop must fall inside the first epoch"
    train_main(quick(data, tiny_dir, tmp_path / "stopped", *flags, "--max_iters", 6, "--resume"))
    whole = {r["iter"]: (r["loss"], r["grad_norm"], r["clips_seen"]) for r in records(tmp_path / "whole", "train")}
    resumed = {r["iter"]: (r["loss"], r["grad_norm"], r["clips_seen"]) for r in records(tmp_path / "stopped", "train")}
    assert whole.keys() == resumed.keys() == set(range(1, 7))
    for it in whole:
        assert resumed[it] == pytest.approx(whole[it], rel=1e-6), it
    assert whole[6][2] > 6 * 3, "windows hold several clips"
    a, b = load_file(tmp_path / "whole" / "latest" / "model.safetensors"), load_file(tmp_path / "stopped" / "latest" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_one_clip_windows_at_zero_without_timestamps_train_as_padded(tmp_path, corpus, tiny_dir):
    """Windows of one clip at 0 s, no timestamps, noise over the clip alone: the packed path then
    trains exactly as padded training (the same batches, noise, SpecAugment, losses)."""
    flags = ["--max_iters", 3, "--eval_interval", 3, "--noise", "white:0.3,babble:0.3,talker:0.2,bank:0.2", "--spec_augment"]
    train_main(quick(corpus, tiny_dir, tmp_path / "padded", *flags))
    train_main(quick(corpus, tiny_dir, tmp_path / "packed", *flags, "--pack", "--pack_clips", 1, "--pack_gap", 0, 0,
                     "--pack_lead", 0, 0, "--pack_no_timestamps", 1, "--pack_noise", "span"))
    padded = {r["iter"]: (r["loss"], r["grad_norm"], r["clips_seen"]) for r in records(tmp_path / "padded", "train")}
    packed = {r["iter"]: (r["loss"], r["grad_norm"], r["clips_seen"]) for r in records(tmp_path / "packed", "train")}
    assert padded.keys() == packed.keys() == {1, 2, 3}
    for it in padded:
        assert packed[it] == pytest.approx(padded[it], rel=1e-5), it


def test_packed_ddp_two_ranks_match_one_process(tmp_path, corpus, tiny_dir):
    """The packed stream and its noise are the same for one process and for two gloo ranks."""
    flags = ["--pack", "--max_iters", 2, "--eval_interval", 2, "--noise", "white:0.3,babble:0.3,talker:0.2,bank:0.2", "--spec_augment"]
    run_train(*quick(corpus, tiny_dir, tmp_path / "one", *flags))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *map(str, quick(corpus, tiny_dir, tmp_path / "two", *flags))]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    check, = records(tmp_path / "two", "ddp_check")
    assert check["ranks_identical"]
    one = {r["iter"]: (r["loss"], r["grad_norm"], r["clips_seen"]) for r in records(tmp_path / "one", "train")}
    two = {r["iter"]: (r["loss"], r["grad_norm"], r["clips_seen"]) for r in records(tmp_path / "two", "train")}
    assert one.keys() == two.keys() == {1, 2}
    for it in one:
        assert one[it] == pytest.approx(two[it], rel=1e-4), it


def test_packing_flags_fail_in_one_line(tmp_path, corpus, tiny_dir, capsys):
    for flags, message in ((["--pack_no_timestamps", 1.5], "--pack_no_timestamps is a share in [0, 1]"),
                           (["--pack_gap", 1, 0.5], "--pack_gap must be seconds LOW <= HIGH"),
                           (["--pack_lead", 1, 0], "--pack_lead must be seconds LOW <= HIGH"),
                           (["--pack_clips", -1], "--pack_clips is a number of clips")):
        with pytest.raises(SystemExit) as e:
            train_main(quick(corpus, tiny_dir, tmp_path / "out", "--pack", *flags))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_train_and_sample_evaluate_alike(tmp_path, corpus, tiny_en_dir, capsys):
    """train.py's evaluation and sample.py --eval with the same decoding options (train.EVAL_DECODING)
    print the same loss-free numbers: the same noisy audio, transcripts and scoring."""
    import sample

    out = tmp_path / "run"
    train_main(quick(corpus, tiny_en_dir, out, "--eval_only", "--eval_samples", 2, "--eval_noise", "white", "--eval_snr", -5))
    results = records(out, "eval")[0]["results"]
    capsys.readouterr()
    assert sample.main(["--model", str(tiny_en_dir), "--eval", str(corpus), "--snr", "-5", "--noise", "white", "--temperature", "0",
                        "--without_timestamps", "--no_speech_threshold", "None", "--logprob_threshold", "None",
                        "--compression_ratio_threshold", "None"]) == 0
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"(clean|white -5 dB)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)%", line)
        if m:
            printed[m.group(1)] = (float(m.group(3)), float(m.group(4)))
    assert set(printed) == set(results) == {"clean", "white -5 dB"}
    for name, (wer, cer) in printed.items():
        assert (wer, cer) == (round(100 * results[name]["wer"], 2), round(100 * results[name]["cer"], 2)), name
    assert printed["white -5 dB"][0] > printed["clean"][0]  # the noise was there, in both
