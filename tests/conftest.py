"""Shared fixtures. Assets come from ../shared (or $DUALWHISPER_SHARED); tests that need an asset
or an optional reference skip where it is missing, except in CI (CI=true), where they fail."""

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
