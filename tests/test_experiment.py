"""The experiment's machinery on CPU: the corpus keeps test sentences and voices out of training,
the arms of a seed see the same clips and noise, the attention plot, and a tiny run of
tools/experiment.py from corpus to results. Tiny random models keep it fast."""

import copy
import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

import dualwhisper as dw
import prepare
import train
from conftest import need
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_en_dir):
    if shutil.which("espeak-ng") is None:
        need(Path("/nonexistent/espeak-ng"))  # skip (fail in CI): the corpus is spoken by espeak-ng
    out = tmp_path_factory.mktemp("corpus") / "data"
    assert prepare.main(["--corpus", str(out), "--hours", "0.03", "--languages", "en", "--model", str(tiny_en_dir), "--workers", "2"]) == 0
    return out


def test_grammar_gives_distinct_sentences_in_both_languages():
    for language in ("en", "az"):
        sentences = prepare.generate_sentences(language, 3000)
        assert len({s.lower() for s in sentences}) == 3000
        assert not any("{" in s or "}" in s for s in sentences)
        assert prepare.generate_sentences(language, 50) == sentences[:50]  # the same draw for the same seed
        splits = [prepare.corpus_split(s) for s in sentences]
        assert 0.05 < splits.count("test") / 3000 < 0.15 and splits.count("val") > 0
    az = prepare.generate_sentences("az", 3000)
    assert any("ə" in s for s in az)
    questions = [s for s in az if s.endswith("?")]
    assert questions and all(s.split()[-1][:-1] in ("mı", "mi", "mu", "mü") for s in questions)


def test_corpus_test_split_shares_no_sentence_and_no_voice_with_training(corpus):
    meta = json.loads((corpus / "meta.json").read_text())
    assert {"train", "val", "test", "noise", "noise_test"} <= set(meta["splits"])
    texts, voices = {}, {}
    for split in ("train", "val", "test"):
        ps = prepare.PreparedSplit(corpus, split)
        assert len(ps) > 0
        rows = [ps.row(i) for i in range(len(ps))]
        texts[split] = {r["text"].lower() for r in rows}
        voices[split] = {r["id"].rsplit("-", 1)[1] for r in rows}  # the id ends in the espeak-ng variant
        assert all(r["speaker"] == r["id"].rsplit("-", 1)[1] for r in rows), "the speaker (for --pack_by speaker): the variant"
    assert not texts["test"] & (texts["train"] | texts["val"])
    assert not texts["val"] & texts["train"]
    assert not voices["test"] & (voices["train"] | voices["val"])
    assert voices["test"] <= set(prepare.TEST_VARIANTS)
    with open(corpus / "source" / "metadata.csv", encoding="utf-8") as f:  # the full voices (language voice + variant) too
        rows = list(csv.DictReader(f))
    by_split = {s: {r["voice"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert by_split["test"] and not by_split["test"] & (by_split["train"] | by_split["val"])
    # noise: training and test recordings are different pieces; music and clatter only at test time
    train_noise = {prepare.PreparedSplit(corpus, "noise").row(i)["id"].split("#")[0] for i in range(len(prepare.PreparedSplit(corpus, "noise")))}
    test_noise = {prepare.PreparedSplit(corpus, "noise_test").row(i)["id"].split("#")[0] for i in range(len(prepare.PreparedSplit(corpus, "noise_test")))}
    assert not any(n.startswith(("music", "clatter")) for n in train_noise)
    assert any(n.startswith("music") for n in test_noise) and any(n.startswith("clatter") for n in test_noise)
    a = prepare.PreparedSplit(corpus, "noise").audio(0)
    assert all(not (len(a) == len(b) and (a == b).all()) for b in map(prepare.PreparedSplit(corpus, "noise_test").audio, range(5)))


def _data_records(out_dir):
    return [r["data"] for r in map(json.loads, open(out_dir / "log.jsonl")) if r["event"] == "train"]


def test_arms_of_a_seed_see_the_same_clips_and_noise(corpus, tiny_en_dir, tmp_path):
    init = tiny_model(tmp_path / "init", tiny_en_dir)
    common = ["--data", str(corpus), "--init_from", str(init), "--max_iters", "3", "--batch_size", "2", "--eval_samples", "0",
              "--eval_interval", "3", "--log_data", "--noise", "bank:0.5,babble:0.25,white:0.25"]
    runs = {"plain": ["--plain"], "dual": [], "dual_kl": ["--consistency", "1"], "other_seed": ["--seed", "7"]}
    for name, flags in runs.items():
        assert train.main(common + ["--out_dir", str(tmp_path / name)] + flags) == 0
    plain = _data_records(tmp_path / "plain")
    assert len(plain) == 3 and all(len(step[0][0]) == 2 for step in plain)
    assert _data_records(tmp_path / "dual") == plain
    assert _data_records(tmp_path / "dual_kl") == plain
    assert _data_records(tmp_path / "other_seed") != plain  # the check can fail: another seed draws other clips and noise
    record = [r for r in map(json.loads, open(tmp_path / "dual_kl" / "log.jsonl")) if r["event"] == "train"][-1]
    assert record["kl"] > -1e-6 and record["gate"] is not None  # a KL, up to rounding (a tiny random model predicts alike)
    steps = lambda name: [r["loss"] for r in map(json.loads, open(tmp_path / name / "log.jsonl")) if r["event"] == "train"]
    assert steps("dual_kl")[0] == steps("dual")[0] and steps("dual_kl")[1:] != steps("dual")[1:]  # the KL term moved the weights
    with pytest.raises(SystemExit):  # a trained gate cannot change its form
        train.main(common + ["--out_dir", str(tmp_path / "layer"), "--gate", "layer"])


def test_attention_plot_for_a_dual_and_a_plain_model(tiny_en_dir, tiny_en_plain, jfk_path, tmp_path, capsys):
    need("matplotlib")
    import sample

    plain = dw.save_model(copy.deepcopy(tiny_en_plain), tmp_path / "plain")  # (save_model points a model at its folder)
    for name, model in (("dual", tiny_en_dir), ("plain", plain)):
        png = tmp_path / f"{name}.png"
        argv = ["--plot", str(png), "--model", str(model), str(jfk_path)] + (["--plot_layer", "1"] if name == "plain" else [])
        assert sample.main(argv) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
        assert "ask not what your country can do for you" in capsys.readouterr().out.lower()
    assert sample.main(["--plot", str(tmp_path / "x.png"), "--model", str(plain), "--plot_layer", "9", str(jfk_path)]) == 2


def test_error_kinds_by_position():
    sys.path.insert(0, str(ROOT / "tools"))
    import experiment

    refs = ["Adam travelled to school last week.", "The old letter is on the shelf.", "Nina cooked dinner."]
    hyps = ["traveled to school last", "The cold letter is on the shelf today.", "Tina cooked the dinner."]
    kinds = experiment.error_kinds(refs, hyps, True)
    # "adam" dropped at the start and "week" at the end; "old" heard as "cold" and "nina" as "tina" (a first word);
    # "today" and "the" added
    assert kinds == {"substituted": 2, "first_word": 1, "deleted": 2, "at_end": 1, "inserted": 2}
    counts = dw.error_counts(refs, hyps)
    assert kinds["substituted"] + kinds["deleted"] + kinds["inserted"] == counts["word_errors"]


def test_tiny_experiment_end_to_end(corpus, tiny_en_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import experiment

    out = tmp_path / "exp"
    argv = ["--out", str(out), "--data", str(corpus), "--init_from", str(tiny_en_dir), "--max_iters", "1", "--batch_size", "2",
            "--warmup_iters", "0", "--learning_rate", "1e-6", "--seeds", "1,2", "--test_clips", "2", "--kinds", "bank",
            "--snrs", "10", "--arms", "plain,dual", "--sample_len", "24", "--threads", "1"]
    assert experiment.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["same_data_per_seed"] == {"1": True, "2": True}
    assert set(results["arms"]) == {"official", "plain", "dual"}
    assert set(results["evaluations"]) == {"official", "plain-s1", "dual-s1", "plain-s2", "dual-s2"}
    assert results["bank_split"] == "noise_test"
    for evaluation in results["evaluations"].values():
        assert set(k for k in evaluation if not k.startswith("_")) == {"clean", "bank 10"}
        assert len(evaluation["clean"]["errors"]) == evaluation["clean"]["clips"] == 2
        noisy = evaluation["bank 10"]  # its transcripts and their errors by kind, which add up to its word errors
        kinds = noisy["kinds"]
        assert len(noisy["hyps"]) == 2 and kinds["substituted"] + kinds["deleted"] + kinds["inserted"] == sum(noisy["errors"])
    official = results["evaluations"]["official"]["clean"]
    assert official["capped_wer"] < 0.9 and official["words"] == results["evaluations"]["dual-s2"]["clean"]["words"]
    assert results["arms"]["dual"]["params"] > results["arms"]["plain"]["params"]
    assert results["arms"]["dual"]["seconds_per_step"][0] > 0
    assert set(results["paired_vs_plain"]) == {"dual"}
    assert "| dual |" in (out / "results.md").read_text() and "| bank 10 dB | dual |" in (out / "results.md").read_text()
    if (out / "wer_vs_snr.png").exists() or need("matplotlib"):
        assert (out / "wer_vs_snr.png").read_bytes()[:4] == b"\x89PNG"
    # a second run finds every stage done and writes the same numbers
    before = (out / "results.md").read_text()
    assert experiment.main(argv) == 0
    assert (out / "results.md").read_text() == before
    # --jobs 2: each seed in a process of its own (seed 2 evaluates its dual run again), then the same report
    (out / "eval" / "dual-s2.json").unlink()
    assert experiment.main(argv + ["--jobs", "2"]) == 0
    assert (out / "results.md").read_text() == before
    assert "dual-s2: clean" in (out / "seed-2.log").read_text() and (out / "eval" / "dual-s2.json").exists()
    # --long_form: one file of the test clips with timestamps, per model, in the results and the report
    assert experiment.main(argv + ["--long_form"]) == 0
    results = json.loads((out / "results.json").read_text())
    lengths = [len(prepare.PreparedSplit(corpus, "test").audio(i)) / 16000 for i in range(2)]
    for name, evaluation in results["evaluations"].items():
        r = evaluation["_long_form"]
        assert r["clips"] == 2 and r["seconds"] == pytest.approx(sum(lengths) + 2 * experiment.LONG_FORM_GAP, abs=0.1), name
    official = results["evaluations"]["official"]["_long_form"]
    assert official["segments"] >= 1 and official["within_half_second"] >= 1, "the first clip starts the file, as its first segment"
    report = (out / "results.md").read_text()
    assert "Long form" in report and all(f"| {arm} | " in report.split("Long form")[1] for arm in ("official", "plain", "dual"))
    # --offset: every test clip after silence, in an out folder of its own (one with other offsets is refused)
    with pytest.raises(SystemExit, match="give this offset an --out of its own"):
        experiment.main(argv + ["--offset", "1"])
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    (shifted / "runs").symlink_to(out / "runs")
    at = {flag: i for i, flag in enumerate(argv)}
    argv1 = list(argv)
    argv1[at["--out"] + 1], argv1[at["--arms"] + 1], argv1[at["--seeds"] + 1] = str(shifted), "dual", "1"
    assert experiment.main(argv1 + ["--offset", "1", "--no_official"]) == 0
    results = json.loads((shifted / "results.json").read_text())
    assert set(results["evaluations"]) == {"dual-s1"} and results["evaluations"]["dual-s1"]["_offset"] == 1.0
    assert "after 1 s of silence" in (shifted / "results.md").read_text()
