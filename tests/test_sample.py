"""Transcription (dualwhisper.transcribe / decode and sample.py) against openai-whisper on the same
weights and audio: identical text, tokens and segment times, greedy and beam search; batching,
language detection, bad input, output files and evaluation."""

import copy
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import IN_CI, LONG_TEXT, ROOT, need

import dualwhisper as dw
import sample

SR = dw.SAMPLE_RATE


def _segments(result):
    return [(round(s["start"], 6), round(s["end"], 6), s["tokens"]) for s in result["segments"]]


def assert_same_transcript(ours, ref):
    assert ours["text"] == ref["text"]
    assert ours["language"] == dw.TO_LANGUAGE_CODE.get(ref["language"].lower(), ref["language"])  # openai-whisper echoes a name as given
    assert _segments(ours) == _segments(ref)
    for a, b in zip(ours["segments"], ref["segments"]):
        assert a["seek"] == b["seek"] and a["temperature"] == b["temperature"]
        for key in ("avg_logprob", "no_speech_prob", "compression_ratio"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (key, a[key], b[key])


# -----------------------------------------------------------------------------
# parity with openai-whisper


def test_jfk_greedy_matches_openai_whisper(tiny_en, openai_tiny_en, jfk_audio):
    whisper = need("whisper")
    ref = whisper.transcribe(openai_tiny_en, jfk_audio, temperature=0.0, fp16=False)
    ours = dw.transcribe(tiny_en, jfk_audio, temperature=0.0)
    assert_same_transcript(ours, ref)
    assert "ask not what your country can do for you" in ours["text"]
    assert [s["gate"] for s in ours["segments"]] == [0.0] * len(ours["segments"])  # official weights: closed gates


@pytest.mark.parametrize("options", [dict(temperature=0.0), dict(temperature=0.0, beam_size=5)], ids=["greedy", "beam5"])
def test_long_audio_matches_openai_whisper(tiny_en, openai_tiny_en, long_audio, options):
    """Over 60 s: several windows, each prompted with the text so far, moved on by timestamps."""
    whisper = need("whisper")
    ref = whisper.transcribe(openai_tiny_en, long_audio, fp16=False, **options)
    ours = dw.transcribe(tiny_en, long_audio, **options)
    assert_same_transcript(ours, ref)
    assert len({s["seek"] for s in ours["segments"]}) >= 2 and ours["segments"][-1]["end"] > 55  # then 4 s of silence


def test_prompt_prefix_and_plain_decode_match_openai_whisper(tiny_en, openai_tiny_en, jfk_audio):
    whisper = need("whisper")
    ref = whisper.transcribe(openai_tiny_en, jfk_audio, temperature=0.0, fp16=False,
                             initial_prompt="President Kennedy, 1961.", condition_on_previous_text=False)
    ours = dw.transcribe(tiny_en, jfk_audio, temperature=0.0, initial_prompt="President Kennedy, 1961.", condition_on_previous_text=False)
    assert_same_transcript(ours, ref)
    mel = dw.pad_or_trim(dw.log_mel_spectrogram(jfk_audio), dw.N_FRAMES)
    for kw in [dict(without_timestamps=True), dict(prefix="And so my", suppress_tokens="", suppress_blank=False),
               dict(prompt="ask not", length_penalty=0.5, beam_size=3, patience=1.5)]:
        r = whisper.decode(openai_tiny_en, mel, whisper.DecodingOptions(fp16=False, language="en", **kw))
        o = dw.decode(tiny_en, mel, **kw)
        assert (o.tokens, o.text) == (r.tokens, r.text), kw
        assert math.isclose(o.avg_logprob, r.avg_logprob, rel_tol=1e-4) and math.isclose(o.no_speech_prob, r.no_speech_prob, rel_tol=1e-4)


@pytest.fixture(scope="module")
def random_multilingual(tmp_path_factory, openai_whisper_from, multilingual_tokenizer_dir):
    """A small randomly initialised multilingual Whisper (99 languages), ours and openai-whisper's."""
    transformers = need("transformers")
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                                     decoder_ffn_dim=256, max_source_positions=1500, max_target_positions=448)
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # confident, varied logits
            if "embed_tokens" in name:
                p.mul_(4.0)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("random-multilingual")
    hf.save_pretrained(folder)
    for f in multilingual_tokenizer_dir.iterdir():
        if not (folder / f.name).exists():
            shutil.copy(f, folder)
    ours = dw.load_model(folder)
    return ours, openai_whisper_from(dw.load_model(folder, dual=False))


@pytest.mark.parametrize("options", [dict(), dict(language="az", task="translate"), dict(language="Azerbaijani", beam_size=2)],
                         ids=["detected", "translate", "beam"])
def test_multilingual_language_and_task_match_openai_whisper(random_multilingual, jfk_audio, options):
    whisper = need("whisper")
    ours_model, ref_model = random_multilingual
    audio = jfk_audio[: 8 * SR]
    options = dict(options, sample_len=24)  # a random model rambles on to the limit
    ref = whisper.transcribe(ref_model, audio, temperature=0.0, fp16=False, **options)
    ours = dw.transcribe(ours_model, audio, temperature=0.0, **options)
    assert_same_transcript(ours, ref)
    if not options:
        mel = dw.pad_or_trim(dw.log_mel_spectrogram(audio), dw.N_FRAMES)
        _, ref_probs = ref_model.detect_language(mel)
        codes, probs = dw.detect_language(ours_model, mel[None])
        assert codes[0] == max(ref_probs, key=ref_probs.get) == ours["language"]
        assert all(math.isclose(probs[0][k], ref_probs[k], rel_tol=1e-3, abs_tol=1e-6) for k in ref_probs)
    with pytest.raises(ValueError, match="unsupported language"):
        dw.transcribe(ours_model, audio, language="klingon")


# -----------------------------------------------------------------------------
# batching, long audio, dual gates


def assert_batched_matches_alone(model, audios, batch_size):
    """Decoded together, each file gives what it gives alone: text and segments. Returns those."""
    alone = [dw.transcribe(model, a, temperature=0.0) for a in audios]
    together = dict(dw.transcribe_many(model, audios, batch_size=batch_size, temperature=0.0))
    assert sorted(together) == list(range(len(audios)))
    for i, a in enumerate(alone):
        b = together[i]
        assert b["text"] == a["text"], i
        assert _segments(b) == _segments(a), i
    return alone


def test_batched_windows_match_one_file_at_a_time(tiny_en, jfk_audio, long_audio):
    """Files of different lengths decoded together (prompts of different lengths left-padded)
    give what each gives alone."""
    audios = [long_audio[: 35 * SR], jfk_audio[: 3 * SR], np.zeros(4 * SR, np.float32)]  # 2nd round: a prompt and none
    alone = assert_batched_matches_alone(tiny_en, audios, batch_size=2)
    assert alone[2]["text"] == "" and alone[1]["text"].strip().startswith("And so")
    assert len({s["seek"] for s in alone[0]["segments"]}) == 2


def test_windows_that_are_not_adjacent_decode_as_alone(tiny_en, jfk_audio, long_audio):
    """A cache for windows 0, 2 and 3 of four, and a batch that a window leaves when it finishes
    first (silence): each window's tokens and log-probability are what it gives alone."""
    mels = torch.stack([dw.log_mel_spectrogram(a, padding=dw.N_SAMPLES)[:, :dw.N_FRAMES] for a in
                        (jfk_audio, np.zeros(5 * SR, np.float32), long_audio[: 25 * SR], jfk_audio[3 * SR:])])
    base = dw.KVCache(tiny_en, dw.encode_audio(tiny_en, mels), 1)
    options = dw.DecodingOptions(temperature=0.0)
    tokenizer = dw.get_tokenizer(tiny_en)
    alone = [dw.decode_windows(tiny_en, tokenizer, base, [i], options, ["en"])[0] for i in range(4)]
    together = dw.decode_windows(tiny_en, tokenizer, base, [0, 1, 2, 3], options, ["en"] * 4)  # window 1 (silence) ends first
    picked = dw.decode_windows(tiny_en, tokenizer, base, [0, 2, 3], options, ["en"] * 3)
    for got, rows in ((together, [0, 1, 2, 3]), (picked, [0, 2, 3])):
        for r, i in zip(got, rows):
            assert r.tokens == alone[i].tokens, i
            assert math.isclose(r.avg_logprob, alone[i].avg_logprob, rel_tol=1e-5), i
    assert len(together[1].tokens) < min(len(together[i].tokens) for i in (0, 2, 3))


def test_long_log_mel_in_chunks_is_the_same(long_audio):
    whole = dw.log_mel_spectrogram(long_audio, padding=dw.N_SAMPLES)
    chunked = dw.padded_log_mel(long_audio, chunk_frames=1234)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_speech_chunks_hold_all_speech_and_cut_in_silence(long_audio):
    """long_audio's pauses are silence: the chunks must hold every sample of its speech, begin and
    end in a pause (or at the file's ends), and last at most 30 s."""
    mel = dw.padded_log_mel(long_audio)
    chunks = dw.speech_chunks(mel, 0, mel.shape[-1] - dw.N_FRAMES)
    assert len(chunks) >= 2 and all(0 < b - a <= dw.N_FRAMES for a, b in chunks)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(chunks, chunks[1:]))
    hop = dw.HOP_LENGTH
    inside = np.zeros(len(long_audio), bool)
    for a, b in chunks:
        inside[a * hop:b * hop] = True
        for edge in (a, b):
            near = long_audio[max(0, edge * hop - 800):edge * hop + 800]  # 50 ms either side
            assert edge == 0 or edge * hop >= len(long_audio) or not np.any(near), (a, b)
    assert inside[np.abs(long_audio) > 1e-4].all()  # no speech left out
    assert dw.speech_chunks(dw.padded_log_mel(np.zeros(40 * SR, np.float32)), 0, 4000) == []


def test_speech_chunks_cut_speech_without_pauses_where_it_is_quietest():
    """70 s of loud noise with a dip of 0.15 s every 7 s and no silence: every frame goes into a
    chunk, and each cut falls in a dip."""
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(70 * SR)).astype(np.float32)
    dips = np.arange(7, 70, 7.0)
    for t in dips:
        audio[int(t * SR):int((t + 0.15) * SR)] *= 0.01
    frames = 70 * dw.FRAMES_PER_SECOND
    chunks = dw.speech_chunks(dw.padded_log_mel(audio), 0, frames)
    assert chunks[0][0] == 0 and chunks[-1][1] == frames and all(b1 == a2 for (_, b1), (a2, _) in zip(chunks, chunks[1:]))
    assert all(b - a <= dw.N_FRAMES for a, b in chunks) and len(chunks) == 3
    for _, cut in chunks[:-1]:
        assert np.min(np.abs(dips - cut / dw.FRAMES_PER_SECOND)) < 0.2, cut


def test_one_long_file_in_batches(tiny_en, long_audio, jfk_audio):
    """transcribe(batch_size=N) decodes a file's silence-cut chunks together: its words are as
    good as the sequential transcript's (WER against what is said within 1 point), its segments
    and words are in order and inside the audio; jfk.flac, speech from end to end, is one chunk
    and gives exactly the sequential result; silence gives nothing."""
    jiwer = need("jiwer")
    sequential = dw.transcribe(tiny_en, long_audio, temperature=0.0)
    batched = dw.transcribe(tiny_en, long_audio, temperature=0.0, batch_size=4, word_timestamps=True)
    wer = {name: jiwer.wer(LONG_TEXT, dw.normalize_text(r["text"])) for name, r in (("sequential", sequential), ("batched", batched))}
    print(wer)
    assert wer["batched"] <= wer["sequential"] + 0.01
    assert [s["id"] for s in batched["segments"]] == list(range(len(batched["segments"])))
    times = [t for s in batched["segments"] for t in (s["start"], s["end"])]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= len(long_audio) / SR
    words = [t for s in batched["segments"] for w in s["words"] for t in (w["start"], w["end"])]
    assert words == sorted(words) and words[-1] <= len(long_audio) / SR
    assert batched["text"] == "".join(s["text"] for s in batched["segments"])
    short = dw.transcribe(tiny_en, jfk_audio, temperature=0.0, batch_size=4)
    assert _segments(short) == _segments(dw.transcribe(tiny_en, jfk_audio, temperature=0.0))
    assert dw.transcribe(tiny_en, np.zeros(45 * SR, np.float32), batch_size=4) == dict(text="", segments=[], language="en")


def test_open_gates_are_reported_per_segment(tiny_en, jfk_audio):
    model = copy.deepcopy(tiny_en)
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.gate.bias.fill_(0.3)  # gate = tanh(0.3) for every token: the second branch mixes in
    result = dw.transcribe(model, jfk_audio, temperature=0.0)
    assert result["segments"] and all(math.isclose(s["gate"], math.tanh(0.3), rel_tol=1e-5) for s in result["segments"])


def test_static_decoding_step_gives_the_same_transcripts(tiny_en, jfk_audio, long_audio):
    """sample.py --compile decodes with fixed-shape steps (use_static_decoding): run as they are,
    they give the same text, segments and log-probabilities as the usual steps, greedy and beam
    search, with prompts of different lengths in one batch (the long file's second window).
    Compiled (traced by dynamo alone: backend "eager", no code generated, seconds), the step is
    one graph per batch shape, which CUDA graphs need, and gives the same text."""
    from torch._dynamo.utils import counters

    static = dw.use_static_decoding(copy.deepcopy(tiny_en), compile=False)
    audios = [long_audio[: 35 * SR], jfk_audio[: 3 * SR]]
    for options in (dict(temperature=0.0), dict(temperature=0.0, beam_size=3)):
        ref = dict(dw.transcribe_many(tiny_en, audios, batch_size=3, **options))
        got = dict(dw.transcribe_many(static, audios, batch_size=3, **options))
        for i in ref:
            assert got[i]["text"] == ref[i]["text"] and _segments(got[i]) == _segments(ref[i])
            for a, b in zip(got[i]["segments"], ref[i]["segments"]):
                assert math.isclose(a["avg_logprob"], b["avg_logprob"], rel_tol=1e-4, abs_tol=1e-5)
    compiled = dw.use_static_decoding(copy.deepcopy(tiny_en), backend="eager")
    counters.clear()
    texts = [dw.transcribe(compiled, jfk_audio, temperature=0.0)["text"] for _ in range(2)]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert texts == [dw.transcribe(tiny_en, jfk_audio, temperature=0.0)["text"]] * 2


def test_options_are_checked():
    for bad in [dict(best_of=2), dict(patience=2.0), dict(beam_size=2, best_of=2), dict(length_penalty=2.0), dict(task="summarise")]:
        with pytest.raises(ValueError):
            dw.DecodingOptions(**bad)


def test_sampling_at_a_temperature(tiny_en, jfk_audio):
    torch.manual_seed(0)
    result = dw.transcribe(tiny_en, jfk_audio[: 6 * SR], temperature=0.3, best_of=3)
    assert "americans" in result["text"].lower() and all(s["temperature"] == 0.3 for s in result["segments"])


# -----------------------------------------------------------------------------
# the command line


def _wav(path, audio, sr=SR, channels=1):
    sf = need("soundfile")
    if sr != SR:
        audio = dw.resample(audio, SR, sr)
    sf.write(str(path), np.stack([audio] * channels, axis=1) if channels > 1 else audio, sr)
    return str(path)


def test_cli_bad_files_are_reported_and_the_others_complete(tiny_en_dir, jfk_path, jfk_audio, tmp_path, capsys):
    rng = np.random.default_rng(0)
    files = {
        "jfk": str(jfk_path),
        "corrupt": tmp_path / "corrupt.wav",
        "empty_file": tmp_path / "empty_file.flac",
        "no_samples": _wav(tmp_path / "no_samples.wav", np.zeros(0, np.float32)),
        "missing": str(tmp_path / "missing.wav"),
        "silence": _wav(tmp_path / "silence.wav", np.zeros(6 * SR, np.float32)),
        "noise": _wav(tmp_path / "noise.wav", (0.1 * rng.standard_normal(6 * SR)).astype(np.float32)),
        "stereo_22k": _wav(tmp_path / "stereo_22k.wav", jfk_audio, 22050, channels=2),
        "mono_8k": _wav(tmp_path / "mono_8k.flac", jfk_audio, 8000),
    }
    files["corrupt"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    files["empty_file"].write_bytes(b"")
    out = tmp_path / "out"
    (out / "jfk.txt").parent.mkdir()
    (out / "jfk.txt").write_text("an old transcript that is replaced as a whole")
    args = [str(f) for f in files.values()] + ["--model", str(tiny_en_dir), "-f", "all", "-o", str(out), "--batch_size", "4"]
    assert sample.main(args) == 1
    stdout, stderr = capsys.readouterr()
    texts = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "") for line in stdout.splitlines())
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert sorted(e.split(": ")[1] for e in errors) == sorted(str(files[k]) for k in ("corrupt", "empty_file", "no_samples", "missing"))
    assert "4 of 9 files failed" in stderr
    for k in ("jfk", "stereo_22k", "mono_8k"):
        assert "ask not what your country can do for you" in dw.normalize_text(texts[str(files[k])]), k
    assert texts[str(files["silence"])] == "" and texts[str(files["noise"])] == ""  # nothing invented
    written = sorted(p.name for p in out.iterdir())
    stems = ("jfk", "mono_8k", "noise", "silence", "stereo_22k")
    assert written == sorted(f"{s}.{e}" for s in stems for e in ("json", "srt", "tsv", "txt", "vtt"))  # nothing half-written
    doc = json.loads((out / "jfk.json").read_text())
    assert doc["language"] == "en" and doc["text"].strip().startswith("And so")
    seg = doc["segments"][0]
    assert set(seg) >= {"start", "end", "text", "tokens", "avg_logprob", "compression_ratio", "no_speech_prob", "gate"}
    assert (out / "jfk.txt").read_text().startswith("And so my fellow Americans")
    srt, vtt = (out / "jfk.srt").read_text(), (out / "jfk.vtt").read_text()
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0") and vtt.startswith("WEBVTT\n\n00:00.000 --> ")


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/folder"], "not found"),
    (["--beam_size", "2", "--best_of", "3", "--temperature_increment_on_fallback", "0"], None),
    (["--patience", "2"], "patience needs beam_size"),
    (["--language", "xx"], "unsupported language"),
    (["--temperature", "-1"], "temperatures cannot be negative"),
    (["--best_of", "0"], "best_of and sample_len must be at least 1"),  # checked at once, not at the first fallback
    (["--device", "cuda:7"], "device cuda:7: "),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--limit", "-1"], "--limit must not be negative"),
], ids=["model", "ok", "patience", "language", "temperature", "best_of", "device", "device_name", "limit"])
def test_cli_settings(tiny_en_dir, jfk_path, capsys, args, message):
    argv = [str(jfk_path), "--model", str(tiny_en_dir)] + args
    code = sample.main(argv)
    stdout, stderr = capsys.readouterr()
    if message is None:
        assert code == 0 and "country" in stdout
    else:
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_cli_warns_that_an_english_only_model_ignores_another_language(tiny_en_dir, jfk_path, capsys):
    assert sample.main([str(jfk_path), "--model", str(tiny_en_dir), "--language", "az"]) == 0
    out, err = capsys.readouterr()
    assert "country" in out
    assert err.strip() == f"warning: {tiny_en_dir} is an English-only model: --language az is ignored, English is transcribed"


def test_cli_without_any_audio_file_stops_before_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load", lambda args: pytest.fail("the model must not be loaded (or downloaded) for nothing"))
    assert sample.main([str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]) == 2
    assert capsys.readouterr().err.strip() == f"error: audio file not found: {tmp_path / 'a.wav'} (nor any of the other 1)"


def test_cli_refuses_outputs_that_would_overwrite_each_other(tiny_en_dir, jfk_path, tmp_path, capsys):
    """a/jfk.flac and b/jfk.flac would both write jfk.txt: refused before anything is written."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(jfk_path, tmp_path / sub / "jfk.flac")
    out = tmp_path / "out"
    argv = [str(tmp_path / "a" / "jfk.flac"), str(tmp_path / "b" / "jfk.flac"), "--model", str(tiny_en_dir), "--output_dir", str(out)]
    code = sample.main(argv)
    stderr = capsys.readouterr().err
    assert code == 2 and "would both be written as jfk.txt" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert sample.main([str(jfk_path), str(jfk_path), "--model", str(tiny_en_dir), "--output_dir", str(out)]) == 0  # the same file twice is fine
    assert (out / "jfk.txt").read_text().startswith("And so")


def test_cli_transcribes_one_long_file_in_batches(tiny_en_dir, long_audio, tmp_path, capsys):
    path = _wav(tmp_path / "long.wav", long_audio)
    assert sample.main([str(path), "--model", str(tiny_en_dir), "--chunked", "--batch_size", "4", "-f", "srt", "-o", str(tmp_path)]) == 0
    assert "ask what you can do for your country" in dw.normalize_text(capsys.readouterr().out)
    srt = (tmp_path / "long.srt").read_text()
    starts = [line.split(" --> ")[0] for line in srt.splitlines() if " --> " in line]
    assert len(starts) >= 5 and starts == sorted(starts) and starts[-1] > "00:00:30"


def test_cli_runs_as_a_script(tiny_en_dir, jfk_path):
    run = subprocess.run([sys.executable, "sample.py", str(jfk_path), "--model", str(tiny_en_dir), "--verbose"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "[00:00.000 --> 00:07.740]" in run.stdout and "ask what you can do for your country" in run.stdout


# -----------------------------------------------------------------------------
# evaluation


def _espeak(text, path):
    if shutil.which("espeak-ng") is None:
        (pytest.fail if IN_CI else pytest.skip)("espeak-ng is not installed")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(path), text], check=True)
    return path


def test_eval_manifest_and_prepared_split_with_noise(tiny_en_dir, jfk_path, tmp_path, capsys):
    prepare = need("prepare")
    texts = ["Please call Stella and ask her to bring these things with her from the store.",
             "I would like a cup of coffee and two slices of bread."]
    rows = [{"path": str(jfk_path), "text": "And so, my fellow Americans: ask not what your country can do for you; "
                                             "ask what you can do for your country."}]
    rows += [{"path": f"clip{i}.wav", "text": t} for i, t in enumerate(texts)]
    for i, t in enumerate(texts):
        _espeak(t, tmp_path / f"clip{i}.wav")
    manifest = tmp_path / "set.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    writer = prepare.SplitWriter(tmp_path / "prepared", "val")
    for r in rows:
        writer.add(dw.load_audio(r["path"] if r["path"].startswith("/") else tmp_path / r["path"]), [50257, 50256], {"id": r["path"], "text": r["text"]})
    writer.close()
    for data, snr, limit in ((manifest, ["-5"], 0), (tmp_path / "prepared", [], 0), (tmp_path / "prepared", ["-5"], 2)):
        args = ["--eval", str(data), "--model", str(tiny_en_dir), "--temperature_increment_on_fallback", "0", "--limit", str(limit)]
        assert sample.main(args + (["--snr", *snr, "--noise", "white", "--seed", "1"] if snr else [])) == 0
        lines = capsys.readouterr().out.splitlines()
        table = {line[:24].strip(): line[24:].split() for line in lines[1:]}
        assert list(table) == ["clean"] + [f"white {s} dB" for s in snr]
        assert all(row[0] == str(limit or 3) for row in table.values())
        wer = {k: float(v[1].rstrip("%")) for k, v in table.items()}
        assert wer["clean"] < 20 and all(wer[k] > wer["clean"] for k in wer if k != "clean"), wer
    for lines, message in (([rows[1], {"path": "clip1.wav"}], "row 2 lacks a path"), ([{"path": "clip0.wav"}], "no transcript column")):
        manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
        assert sample.main(["--eval", str(manifest), "--model", str(tiny_en_dir)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_eval_noise_folder_and_a_set_without_texts(tiny_en_dir, jfk_audio, tmp_path, capsys):
    prepare = need("prepare")
    import soundfile as sf

    folder = tmp_path / "noises"
    folder.mkdir()
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="no audio files .* with samples"):
        sample.noise_bank(folder)
    sf.write(folder / "hum.wav", 0.1 * np.sin(np.arange(16000) * 2 * np.pi * 120 / 16000).astype(np.float32), 16000)
    bank = sample.noise_bank(folder)  # the empty recording left out: drawn, it would have added nothing
    assert len(bank) == 1 and len(bank[0]) == 16000
    writer = prepare.SplitWriter(tmp_path / "prepared", "val")  # clips without transcripts, as a noise split has
    writer.add(jfk_audio, [50257, 50256], {"id": "a", "text": ""})
    writer.close()
    assert sample.main(["--eval", str(tmp_path / "prepared"), "--model", str(tiny_en_dir)]) == 2
    assert "no clip has a reference text" in capsys.readouterr().err


def test_pool_clips_after_a_lead_of_silence_keep_their_noise_over_the_clip(monkeypatch):
    class Split:  # a prepared split's int16 clips
        def audio(self, i):
            return np.full(800 + 400 * i, 3277 * (-1) ** i, np.int16)

    pool = sample._Clips(Split(), 2)
    clips = [pool[0], pool[1]]
    mixer = dw.NoiseMixer.fixed("white", 0.0, seed=3)
    seen = {}

    def fake_transcribe_many(model, audios, **kwargs):
        for i, a in enumerate(audios):
            seen[i] = a
            yield i, {"text": f"clip {i}"}

    monkeypatch.setattr(dw, "transcribe_many", fake_transcribe_many)
    assert sample.transcribe_pool(None, pool, mixer, None, 2, {}, lead=160) == ["clip 0", "clip 1"]
    for i, clip in enumerate(clips):
        noisy = mixer(torch.from_numpy(clip)[None], [len(clip)], [i], exclude=[i])[0].numpy()
        assert len(seen[i]) == 160 + len(clip)
        assert not seen[i][:160].any(), "the lead is silence: no noise before the clip"
        np.testing.assert_array_equal(seen[i][160:], noisy)
        assert not np.array_equal(noisy, clip)
