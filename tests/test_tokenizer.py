"""The tokenizer against openai-whisper's, built from the checkpoints' own vocabulary files."""

import pytest

import dualwhisper as dw
from conftest import need

TEXTS = [
    " And so my fellow Americans, ask not what your country can do for you.",
    "Azərbaycan dili türk dilləri ailəsinin oğuz qrupuna daxildir. Şəki, Gəncə və Bakı!",
    " Mən bu gün səhər saat yeddidə oyandım, çay içdim və işə getdim.",
    "ĞÜŞİÖÇƏ ğüşıöçə — İstanbul'dan Naxçıvan'a 1 250,75 km?",
    "数字 123,456.78 “quotes” 'it's' I'll we've they're",
    "  multiple   spaces\n\ttabs and\r\nnewlines  ",
    "émoji 🎉 and ♪ music ♪ (laughs) [applause]",
    "<|endoftext|> written as text stays text",
    "",
]


@pytest.fixture(scope="module", params=["english", "multilingual"])
def pair(request, tiny_en_dir, multilingual_tokenizer_dir):
    whisper = need("whisper")
    multilingual = request.param == "multilingual"
    ours = dw.Tokenizer.from_pretrained(multilingual_tokenizer_dir if multilingual else tiny_en_dir, language="az" if multilingual else None)
    ref = whisper.tokenizer.get_tokenizer(multilingual, num_languages=99, language="az" if multilingual else None, task="transcribe")
    return ours, ref, multilingual


def test_ids_and_round_trip(pair):
    ours, ref, _ = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encoding.encode(text, disallowed_special=())
        assert ours.decode(ids) == text == ref.decode(ids)
    assert ours.n_vocab == ref.encoding.n_vocab


def test_special_tokens_in_official_order(pair):
    ours, ref, multilingual = pair
    assert ours.special_tokens == dict(ref.encoding._special_tokens)
    for name in ("eot", "sot", "sot_prev", "sot_lm", "no_speech", "no_timestamps", "timestamp_begin"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.transcribe_token == ref.transcribe and ours.translate_token == ref.translate
    assert sorted(ours.all_language_tokens) == sorted(ref.all_language_tokens)
    assert tuple(ours.sot_sequence()) == ref.sot_sequence
    assert ours.non_speech_tokens == list(ref.non_speech_tokens)
    assert ours.special_tokens["<|30.00|>"] == ours.n_vocab - 1
    timestamps = [ours.timestamp_begin + 54] + ours.encode(" so") + [ours.timestamp_begin + 100]
    assert ours.decode_with_timestamps(timestamps) == ref.decode_with_timestamps(timestamps) == "<|1.08|> so<|2.00|>"
    assert ours.decode(timestamps) == " so"
    if multilingual:
        assert ours.sot_sequence(language="azerbaijani", task="translate") == [ours.sot, ours.special_tokens["<|az|>"], ours.translate_token]
        assert ours.special_tokens["<|az|>"] == 50304  # as the checkpoint's generation config says


def test_tokenizer_sizes_follow_the_model(tiny_en_dir, multilingual_tokenizer_dir):
    assert dw.Tokenizer.from_pretrained(tiny_en_dir).n_vocab == 51864
    v3 = dw.Tokenizer.from_pretrained(multilingual_tokenizer_dir, n_vocab=51866)  # large-v3 adds <|yue|>
    assert v3.n_vocab == 51866 and "<|yue|>" in v3.special_tokens
    with pytest.raises(ValueError, match="unsupported language"):
        dw.Tokenizer.from_pretrained(multilingual_tokenizer_dir, language="klingon")


def test_missing_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        dw.Tokenizer.from_pretrained(tmp_path)
