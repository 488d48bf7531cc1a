"""The scripts at the edges: --help, the modes of the files they write, what the tests leave behind."""

import argparse
import os
import re
import stat
import subprocess
import sys
import time

import pytest
import torch

import dualwhisper as dw
from conftest import ROOT


def _parsers(monkeypatch):
    """The argument parsers of sample.py, train.py and prepare.py, as their main functions build them."""
    import prepare
    import sample
    import train

    made = []

    def keep(self, *args, **kwargs):
        made.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep)
    for build in (lambda: sample.parse_args([]), lambda: prepare.main([])):
        with pytest.raises(SystemExit):
            build()
    return {"sample.py": made[0], "prepare.py": made[1], "train.py": train.get_parser()}


def test_help_shows_every_default(monkeypatch):
    for script, parser in _parsers(monkeypatch).items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            d = action.default
            if not action.option_strings or d is None or d is False or d in ([], argparse.SUPPRESS):
                continue
            text = " ".join(formatter._format_action(action).split())
            assert "default" in text, f"{script} {action.option_strings[0]}: {text}"
    text = " ".join(_parsers(monkeypatch)["sample.py"].format_help().split())
    assert "(default: small)" in text and "(default: 8)" in text  # --model, --batch_size


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_modes_of_open(tmp_path, umask):
    """Transcripts, subtitles and checkpoint folders are written under temporary names and renamed:
    they must still get the modes that open() and mkdir() give under the umask."""
    import sample
    import train

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        (tmp_path / "plain_dir").mkdir()
        sample.write_atomic(tmp_path / "talk.srt", "1\n00:00:00,000 --> 00:00:01,000\nhello\n\n")
        dims = dw.ModelDimensions(n_audio_ctx=8, n_audio_state=8, n_audio_head=1, n_audio_layer=1, n_vocab=51864, n_text_ctx=8,
                                  n_text_state=8, n_text_head=1, n_text_layer=1)
        model = dw.Whisper(dims)
        folder = dw.save_model(model, tmp_path / "run" / "best")
        latest = train.save_checkpoint(model, tmp_path / "run", "latest", {}, state={"step": torch.tensor(1)})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "plain") == 0o666 & ~umask and mode(tmp_path / "plain_dir") == 0o777 & ~umask
    assert mode(tmp_path / "talk.srt") == mode(tmp_path / "plain")
    assert mode(folder) == mode(tmp_path / "plain_dir") and mode(folder.parent) == mode(tmp_path / "plain_dir")
    assert mode(latest) == mode(folder)
    assert [p.name for p in [*folder.iterdir(), *latest.iterdir()] if mode(p) != mode(tmp_path / "plain")] == []


def test_passing_tests_leave_nothing_in_the_temp_folder(tmp_path):
    """With the project's pytest settings, a passing run removes its temporary folders (pytest's
    default keeps the last three runs, which is gigabytes here: model checkpoints, prepared data)."""
    (tmp_path / "test_writes.py").write_text("def test_writes(tmp_path, tmp_path_factory):\n"
                                             "    (tmp_path / 'a.bin').write_bytes(bytes(1 << 20))\n"
                                             "    (tmp_path_factory.mktemp('shared') / 'b.bin').write_bytes(bytes(1 << 20))\n")
    root = tmp_path / "temp"
    root.mkdir()
    env = {**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
                        "--rootdir", str(tmp_path), str(tmp_path / "test_writes.py")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    left = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in left) < 1 << 16, left


# -----------------------------------------------------------------------------
# train.py at its edges (fixtures and helpers of test_train.py: a tiny random model, jfk.flac pieces)

from test_train import corpus, quick, records, tiny_dir, tokenizer, train_main  # noqa: E402,F401


def test_train_start_that_fails_leaves_no_run_folder(tmp_path, corpus, tiny_dir, capsys, monkeypatch):
    """Bad settings, missing data or a model that cannot be loaded: one line that names the flag to
    fix, no run folder left behind, and no config line printed first."""
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("the hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    cases = [(["--data", tmp_path / "nowhere"], "no prepared split"), (["--init_from", tmp_path / "missing"], "--init_from"),
             (["--init_from", "someone/no-such-model"], "--init_from someone/no-such-model: cannot download"),
             (["--plain", "--freeze", "base"], "nothing to train"), (["--noise", "rain:0.5"], "unknown kind")]
    for extra, message in cases:
        out = tmp_path / "run"
        with pytest.raises(SystemExit) as e:
            train_main(quick(corpus, tiny_dir, out, "--max_iters", 1, *extra))
        captured = capsys.readouterr()
        assert e.value.code == 2 and message in captured.err and "--model" not in captured.err, (extra, captured.err)
        assert "config:" not in captured.out and not out.exists(), extra


def test_evaluations_say_so_and_count_in_the_eta(tmp_path, corpus, tiny_dir, capsys, monkeypatch):
    import train

    slow = 0.5
    evaluate = train.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(slow)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    out = tmp_path / "run"
    train_main(quick(corpus, tiny_dir, out, "--max_iters", 4, "--eval_interval", 2, "--eval_samples", 2, "--eval_snr"))
    lines = capsys.readouterr().out.splitlines()
    starts = [i for i, line in enumerate(lines) if re.fullmatch(r"eval at step \d: 2 clips, clean \.\.\.", line)]
    results = [i for i, line in enumerate(lines) if line.startswith("eval at step") and "WER" in line]
    assert len(starts) == len(results) == 3 and all(a < b for a, b in zip(starts, results))  # steps 0, 2 and 4
    eta = {r["iter"]: r["eta_s"] for r in records(out, "train")}
    # evaluations still to come after steps 1, 2, 3 and 4: at 2 and 4, at 2 and 4, at 4, at 4
    assert eta[1] >= 2 * slow and eta[2] >= 2 * slow and slow <= eta[3] < eta[2] and eta[4] >= slow, eta
