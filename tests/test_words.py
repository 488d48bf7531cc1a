"""Word timestamps, clip_timestamps and hallucination_silence_threshold against openai-whisper on
the same weights (its alignment heads set from the checkpoint's generation config), and the output
files that carry words (srt, vtt, tsv, json) against openai-whisper's writers."""

import copy
import json
import re

import numpy as np
import pytest
import torch
from conftest import need

import dualwhisper as dw
import sample

SR = dw.SAMPLE_RATE
TOLERANCE = 0.02  # seconds: one step of the alignment (an encoder position)


@pytest.fixture(scope="module")
def openai_aligned(openai_tiny_en, tiny_en):
    """openai-whisper's model with the checkpoint's alignment heads (as openai-whisper's own
    tiny.en download has them), not its default of every head in the decoder's second half."""
    mask = torch.zeros(tiny_en.dims.n_text_layer, tiny_en.dims.n_text_head, dtype=torch.bool)
    for layer, head in tiny_en.generation_config["alignment_heads"]:
        mask[layer, head] = True
    openai_tiny_en.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return openai_tiny_en


def _words(result):
    return [w for s in result["segments"] for w in s["words"]]


def assert_same_words(ours, ref):
    """The same segments and words, times within TOLERANCE; returns the largest differences of
    word starts and ends."""
    assert ours["text"] == ref["text"]
    assert [s["text"] for s in ours["segments"]] == [s["text"] for s in ref["segments"]]
    for a, b in zip(ours["segments"], ref["segments"]):
        assert a["seek"] == b["seek"]
        assert abs(a["start"] - b["start"]) <= TOLERANCE and abs(a["end"] - b["end"]) <= TOLERANCE, (a, b)
        assert [w["word"] for w in a["words"]] == [w["word"] for w in b["words"]]
    ow, rw = _words(ours), _words(ref)
    assert ow, "no words"
    d_start = max(abs(a["start"] - b["start"]) for a, b in zip(ow, rw))
    d_end = max(abs(a["end"] - b["end"]) for a, b in zip(ow, rw))
    assert d_start <= TOLERANCE + 1e-9 and d_end <= TOLERANCE + 1e-9, (d_start, d_end)
    assert all(abs(a["probability"] - b["probability"]) < 1e-3 for a, b in zip(ow, rw))
    return d_start, d_end


def both_with_words(ours_model, ref_model, audio):
    """(ours, openai-whisper's) greedy transcripts of `audio` with word timestamps."""
    whisper = need("whisper")
    ours = dw.transcribe(ours_model, audio, temperature=0.0, word_timestamps=True)
    return ours, whisper.transcribe(ref_model, audio, temperature=0.0, fp16=False, word_timestamps=True)


@pytest.fixture(scope="module")
def long_words(tiny_en, openai_aligned, long_audio):
    return both_with_words(tiny_en, openai_aligned, long_audio)


@pytest.fixture(scope="module")
def jfk_words(tiny_en, openai_aligned, jfk_audio):
    return both_with_words(tiny_en, openai_aligned, jfk_audio)


# -----------------------------------------------------------------------------
# word times


def test_dtw_takes_openai_whispers_path():
    """Costs with many ties (small integers) and real-valued ones: the same path, step by step."""
    timing = need("whisper.timing")
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 7), (7, 1), (5, 9), (23, 300), (40, 41)]:
        for cost in (rng.integers(0, 3, shape).astype(np.float64), rng.standard_normal(shape)):
            ours = dw.dtw(cost)
            ref = timing.dtw_cpu(cost)
            assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1]), shape


def test_word_timestamps_match_openai_whisper_on_jfk(jfk_words):
    ours, ref = jfk_words
    d_start, d_end = assert_same_words(ours, ref)
    print(f"jfk.flac: max |start difference| {1000 * d_start:.0f} ms, max |end difference| {1000 * d_end:.0f} ms")
    words = _words(ours)
    assert [w["word"] for w in words[:4]] == [" And", " so", " my", " fellow"]
    assert all(0 <= w["start"] <= w["end"] <= 11.0 and 0 < w["probability"] <= 1 for w in words)
    assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))


def test_word_timestamps_match_openai_whisper_on_long_audio(long_words):
    """Several windows, each aligned on its own, seeking on from the last word's end."""
    ours, ref = long_words
    d_start, d_end = assert_same_words(ours, ref)
    print(f"long file: max |start difference| {1000 * d_start:.0f} ms, max |end difference| {1000 * d_end:.0f} ms")
    assert len({s["seek"] for s in ours["segments"]}) >= 2 and _words(ours)[-1]["end"] > 50


def _synthetic_window(rng, eot):
    """Segments of one window and an alignment of their words as DTW might give it: words of
    20 ms steps, some far too long, pauses, punctuation of their own, sentence ends."""
    vocab = [" so", " we", " went", " home", " and", " then", " it", " rained", ",", ".", "?", " (", ")", '"']
    t, alignment, tokens = int(rng.integers(0, 100)), [], []
    for k in range(int(rng.integers(3, 14))):
        word = vocab[int(rng.integers(len(vocab)))]
        t += int(rng.choice([0, 0, 5, 150, 300])) if k else 0  # a pause before some words
        length = int(rng.choice([0, 3, 10, 20, 60, 120, 200]))  # 0 to 4 s
        toks = [int(x) for x in rng.integers(1, eot, int(rng.integers(1, 3)))]
        alignment.append(dict(word=word, tokens=toks, start=t / 50, end=(t + length) / 50, probability=float(rng.random())))
        tokens += toks
        t += length
    cut = sorted(int(x) for x in rng.integers(1, len(tokens), 2)) if len(tokens) > 2 else [len(tokens)] * 2
    seek = int(rng.integers(0, 2000))
    offset = seek / 100
    segments = []
    for a, b in zip([0] + cut, cut + [len(tokens)]):
        start, end = sorted(offset + rng.integers(0, 1500, 2) / 50)
        segments.append(dict(seek=seek, start=float(start), end=float(end), tokens=[eot + 10] + tokens[a:b] + [eot + 20]))
    return segments, alignment, float(offset + rng.integers(-200, 300) / 50)


def test_word_corrections_match_openai_whisper(tiny_en, monkeypatch):
    """openai-whisper's corrections of the aligned words (long words cut at sentence ends and after
    pauses, punctuation merged, segment bounds moved to the words or the words to the bounds) on
    many made-up windows, the alignment itself given to both."""
    timing = need("whisper.timing")
    tokenizer = dw.get_tokenizer(tiny_en)
    rng = np.random.default_rng(0)
    for case in range(300):
        segments, alignment, last_speech = _synthetic_window(rng, tokenizer.eot)
        monkeypatch.setattr(dw, "find_alignment", lambda *args, **kw: copy.deepcopy(alignment))
        monkeypatch.setattr(timing, "find_alignment", lambda *a, **kw: [timing.WordTiming(**w) for w in copy.deepcopy(alignment)])
        ours, ref = copy.deepcopy(segments), copy.deepcopy(segments)
        dw.add_word_timestamps(tiny_en, tokenizer, ours, None, 3000, last_speech)
        timing.add_word_timestamps(segments=ref, model=None, tokenizer=tokenizer, mel=None, num_frames=3000, last_speech_timestamp=last_speech)
        assert ours == ref, case


def test_punctuation_is_merged_into_words(tiny_en):
    tokenizer = dw.get_tokenizer(tiny_en)
    tokens = tokenizer.encode(' "Hello," she said (quietly). Done!')
    words, groups = dw.split_to_word_tokens(tokenizer, tokens + [tokenizer.eot])
    alignment = [dict(word=w, tokens=t) for w, t in zip(words, groups)]
    dw.merge_punctuations(alignment)
    assert [a["word"] for a in alignment if a["word"]] == [' "Hello,"', " she", " said", " (quietly).", " Done!", "<|endoftext|>"]
    assert sum(len(a["tokens"]) for a in alignment) == len(tokens) + 1


def test_dual_models_align_with_the_primary_branch(tiny_en, tiny_en_plain, jfk_audio):
    """A dual model with its gates opened a little (the text stays) gives the word times of plain
    Whisper: the alignment heads are read from cross_attn, not from the second branch (random here)."""
    model = copy.deepcopy(tiny_en)
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.gate.bias.fill_(1e-4)
    a = dw.transcribe(tiny_en_plain, jfk_audio, temperature=0.0, word_timestamps=True)
    b = dw.transcribe(model, jfk_audio, temperature=0.0, word_timestamps=True)
    assert [(w["word"], w["start"], w["end"]) for w in _words(a)] == [(w["word"], w["start"], w["end"]) for w in _words(b)]


# -----------------------------------------------------------------------------
# clips and hallucinations


def test_clip_timestamps_match_openai_whisper(tiny_en, openai_aligned, long_audio):
    """Two clips, the second running to the end: windows start at the clips and stop at their ends."""
    whisper = need("whisper")
    clips = "5,20,33"
    ref = whisper.transcribe(openai_aligned, long_audio, temperature=0.0, fp16=False, clip_timestamps=clips, word_timestamps=True)
    ours = dw.transcribe(tiny_en, long_audio, temperature=0.0, clip_timestamps=clips, word_timestamps=True)
    assert_same_words(ours, ref)
    assert ours["segments"][0]["seek"] == 500 and {s["seek"] for s in ours["segments"]} >= {500, 3300}
    assert all(not 20.0 < w["start"] < 33.0 for w in _words(ours))  # nothing from between the clips
    with pytest.raises(ValueError, match="clip_timestamps"):
        dw.transcribe(tiny_en, long_audio, clip_timestamps="5,x")


def test_hallucination_silence_threshold_matches_openai_whisper(tiny_en, openai_aligned, long_audio):
    """The long file with faint noise (-50 dB) under its silences, where tiny.en makes short
    segments that look like hallucinations: with the threshold, decoding skips past them, as
    openai-whisper does (the result differs from decoding without it)."""
    whisper = need("whisper")
    noisy = long_audio + 0.003 * np.random.default_rng(0).standard_normal(len(long_audio)).astype(np.float32)
    options = dict(temperature=0.0, word_timestamps=True, hallucination_silence_threshold=2.0)
    ref = whisper.transcribe(openai_aligned, noisy, fp16=False, **options)
    ours = dw.transcribe(tiny_en, noisy, **options)
    assert_same_words(ours, ref)
    without = dw.transcribe(tiny_en, noisy, temperature=0.0, word_timestamps=True)
    assert [s["seek"] for s in without["segments"]] != [s["seek"] for s in ours["segments"]]


# -----------------------------------------------------------------------------
# output files


class _Writers:
    """openai-whisper's writers, returning the text."""

    def __init__(self):
        utils = need("whisper.utils")
        self.classes = dict(srt=utils.WriteSRT, vtt=utils.WriteVTT, tsv=utils.WriteTSV)

    def __call__(self, fmt, result, **options):
        import io

        f = io.StringIO()
        self.classes[fmt](".").write_result(result, f, **options)
        return f.getvalue()


@pytest.mark.parametrize("options", [dict(), dict(max_line_width=24, max_line_count=2), dict(max_line_width=16),
                                     dict(highlight_words=True), dict(max_line_width=30, max_line_count=1, highlight_words=True),
                                     dict(max_words_per_line=3)],
                         ids=["segments", "width_count", "width", "highlight", "all", "words_per_line"])
def test_subtitles_with_words_match_openai_whisper(long_words, options):
    ours, _ = long_words
    gaps = copy.deepcopy(ours)  # with silences between some words, which highlighting shows without underline
    for w in _words(gaps)[::3]:
        w["start"] = min(w["end"], round(w["start"] + 0.1, 2))
    late = copy.deepcopy(ours)  # past the first hour: VTT shows hours from there on, SRT always
    for item in late["segments"] + _words(late):
        item["start"], item["end"] = item["start"] + 3600, item["end"] + 3600
    writers = _Writers()
    for result in (ours, gaps, late):
        for fmt, ours_text in (("srt", sample.to_srt(result, **options)), ("vtt", sample.to_vtt(result, **options))):
            assert ours_text == writers(fmt, result, **options), (fmt, options)
    if options.get("highlight_words"):
        assert "<u>" in ours_text
    if options.get("max_line_width"):
        lines = [line for line in ours_text.splitlines() if line and "-->" not in line and line != "WEBVTT"]
        assert max(len(re.sub("</?u>", "", line)) for line in lines) <= options["max_line_width"] + 12  # a long word may overflow


def test_tsv_and_json_carry_the_words(long_words):
    ours, _ = long_words
    assert sample.to_tsv(ours) == _Writers()("tsv", ours)
    lines = sample.to_tsv(ours).splitlines()
    assert lines[0] == "start\tend\ttext" and lines[1].split("\t")[0] == str(round(1000 * ours["segments"][0]["start"]))
    doc = json.loads(sample.to_json(ours))
    assert doc["segments"][0]["words"] == ours["segments"][0]["words"] and set(doc["segments"][0]["words"][0]) == {"word", "start", "end", "probability"}


def test_cli_word_timestamps_in_every_format(tiny_en_dir, jfk_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(jfk_path), "--model", str(tiny_en_dir), "-f", "all", "-o", str(out), "--word_timestamps", "True",
            "--max_line_width", "20", "--max_line_count", "2", "--highlight_words", "True"]
    assert sample.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"jfk.{e}" for e in ("json", "srt", "tsv", "txt", "vtt")]
    words = [w for s in json.loads((out / "jfk.json").read_text())["segments"] for w in s["words"]]
    assert words[0]["word"] == " And" and words[-1]["word"].rstrip(".") == " country"
    srt = (out / "jfk.srt").read_text()
    assert srt.startswith("1\n00:00:00,000 --> 00:00:00,") and "<u>And</u> so my fellow\nAmericans" in srt
    assert (out / "jfk.tsv").read_text().startswith("start\tend\ttext\n0\t")
    capsys.readouterr()
    for flag, value in (("--highlight_words", "True"), ("--max_line_width", "20"), ("--hallucination_silence_threshold", "2")):
        with pytest.raises(SystemExit):
            sample.parse_args([str(jfk_path), flag, value])
        assert "needs --word_timestamps True" in capsys.readouterr().err


def test_cli_prints_segments_as_they_come_on_a_terminal(tiny_en_dir, jfk_path, capsys, monkeypatch):
    """As openai-whisper's command: segments with their times on a terminal (or --verbose True),
    the text alone when the output is piped (or --verbose False)."""
    argv = [str(jfk_path), "--model", str(tiny_en_dir), "--clip_timestamps", "0,8"]
    monkeypatch.setattr(sample.sys.stdout, "isatty", lambda: True)
    assert sample.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("[00:00.000 --> 00:0") and "country can do for you" in out and "ask what you" not in out
    assert sample.main(argv + ["--verbose", "False"]) == 0
    out = capsys.readouterr().out
    assert "-->" not in out and out.strip().startswith("And so my fellow Americans")
    monkeypatch.setattr(sample.sys.stdout, "isatty", lambda: False)
    assert sample.main(argv) == 0
    assert "-->" not in capsys.readouterr().out
