"""normalize_text: the text that word error rates are computed on must be the one Whisper's own
evaluations use, so that the figures compare with published ones. The cases are those of
openai-whisper's normaliser tests (numbers, spellings, contractions, titles)."""

import pytest

import dualwhisper as dw
from conftest import need

ENGLISH = [  # (as spoken or written, as compared)
    # cardinals, years, decimals, scales
    ("two", "2"), ("thirty one", "31"), ("five twenty four", "524"), ("nineteen ninety nine", "1999"),
    ("twenty nineteen", "2019"), ("two point five million", "2500000"), ("four point two billions", "4200000000s"),
    ("200 thousand", "200000"), ("three thousand twenty nine", "3029"), ("forty three thousand two hundred sixty", "43260"),
    ("forty three thousand two hundred and sixty", "43260"), ("three billion", "3000000000"), ("millions", "1000000s"),
    ("three and a half million", "3500000"), ("3 14", "3 14"), ("3.14", "3.14"), ("3 point 2", "3.2"),
    ("3 point 14", "3.14"), ("fourteen point 4", "14.4"),
    # currencies and percentages
    ("200 thousand dollars", "$200000"), ("$20 million", "$20000000"), ("€52.4 million", "€52400000"),
    ("£77 thousands", "£77000s"), ("two point two five dollars", "$2.25"), ("two hundred million dollars", "$200000000"),
    ("$20.1 million", "$20100000"), ("two dollars and seventy cents", "$2.70"), ("3 cents", "¢3"), ("$0.36", "¢36"),
    ("three euros and sixty five cents", "€3.65"), ("forty eight and a half dollars", "$48.5"),
    ("ninety percent", "90%"), ("seventy six per cent", "76%"),
    # ordinals, dates, decades, signs
    ("nineteen fifties", "1950s"), ("thirty first", "31st"), ("thirty three thousand and three hundred and thirty third", "33333rd"),
    ("july third twenty twenty", "july 3rd 2020"), ("august twenty sixth twenty twenty one", "august 26th 2021"),
    ("two thousandth", "2000th"), ("thirty two thousandth", "32000th"), ("10 th", "10th"), ("10th", "10th"),
    ("minus 500", "-500"), ("positive twenty thousand", "+20000"),
    # digits read one by one, doubled and tripled
    ("two double o eight", "2008"), ("double oh seven", "007"), ("double zero seven", "007"), ("nine one one", "911"),
    ("nine double one", "911"), ("one triple oh one", "10001"),
    # letters and digits apart, units
    ("b747", "b 747"), ("10km", "10 km"), ("10mm", "10 mm"), ("RC232", "rc 232"),
    # British spellings, contractions, titles
    ("mobilisation", "mobilization"), ("cancelation", "cancellation"),
    ("Let's", "let us"), ("he's like", "he is like"), ("she's been like", "she has been like"),
    ("Mr. Park visited Assoc. Prof. Kim Jr.", "mister park visited associate professor kim junior"),
]


@pytest.mark.parametrize("text,expected", ENGLISH)
def test_english_as_whisper_evaluates(text, expected):
    assert dw.normalize_text(text) == expected


def test_basic_normaliser_for_other_languages():
    n = lambda s: dw.normalize_text(s, english=False)
    assert n("Salam, necəsən? Yaxşıyam!") == "salam necəsən yaxşıyam"  # letters and diacritics kept
    assert n("Üç [musiqi] min (gülür) iyirmi — beş") == "üç min iyirmi beş"
    # as in openai-whisper: lower() turns a capital İ into i and a combining dot, which becomes a space
    assert n("İki") == "i ki"
    assert n("Ça va? Très bien, merci.") == "ça va très bien merci"
    assert n("twenty-five percent") == "twenty five percent"  # no English rules
    assert n("  ") == "" and dw.normalize_text("(laughs) [music] uh") == ""


def test_same_text_as_openai_whisper():
    """On sentences outside the cases above, the same output as openai-whisper's own module."""
    normalizers = need("whisper.normalizers")
    sentences = ["I can't go (laughs) [music] uh, it's 1,000 dollars.", "The colour of the theatre's centre, Dr. Smith's favourite.",
                 "We met on the 3rd of March, 2021 at 5:30pm -- about two and a half hours.", "Hmm, it's gonna be 50% off, y'all!",
                 "Café — naïve coöperation; Œuvre & Ægis.", "He said: 'twenty-five' <unk> things"]
    for s in sentences:
        assert dw.normalize_text(s) == " ".join(normalizers.EnglishTextNormalizer()(s).split()), s
        assert dw.normalize_text(s, english=False) == " ".join(normalizers.BasicTextNormalizer()(s).split()), s
