"""Loading: checkpoints that the references themselves wrote (Hugging Face layout in each dtype,
sharded, OpenAI's .pt), our own checkpoints, and each failure's one-line error."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dualwhisper as dw
from conftest import ROOT, need


@pytest.fixture(scope="module")
def random_multilingual(tmp_path_factory):
    """A randomly initialised multilingual Whisper of a shape unlike tiny.en, saved by
    transformers itself in the hub layout, next to the reference model."""
    transformers = need("transformers")
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=1500, max_target_positions=448)
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # trained-looking biases and norms rather than zeros and ones
        for name, p in hf.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("random-multilingual")
    hf.save_pretrained(folder)
    return folder, hf


def _inputs(n_mels=80, n_tokens=7):
    g = torch.Generator().manual_seed(1)
    mel = torch.randn(2, n_mels, dw.N_FRAMES, generator=g) * 0.5
    tokens = torch.randint(0, 50257, (2, n_tokens), generator=g)
    tokens[:, 0] = 50258  # <|startoftranscript|> of a multilingual vocabulary
    return mel, tokens


def test_random_multilingual_checkpoint_matches_transformers(random_multilingual):
    folder, hf = random_multilingual
    assert (folder / "model.safetensors").exists()
    mel, tokens = _inputs()
    with torch.no_grad():
        ref = hf(input_features=mel, decoder_input_ids=tokens).logits
        for dual in (True, False):
            model = dw.load_model(folder, dual=dual)
            assert model.dims.n_text_layer == 3 and model.dims.n_audio_head == 4 and model.is_multilingual
            assert (model(mel, tokens) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_sharded_files(random_multilingual, tmp_path, dtype):
    transformers = need("transformers")
    folder, hf = random_multilingual
    half = transformers.WhisperForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype)
    half.save_pretrained(tmp_path, max_shard_size="400KB")  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ref_model = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    mel, tokens = _inputs()
    model = dw.load_model(tmp_path)
    assert model.decoder.token_embedding.weight.dtype == torch.float32
    with torch.no_grad():
        assert (model(mel, tokens) - ref_model(input_features=mel, decoder_input_ids=tokens).logits).abs().max().item() < 1e-4
    low = dw.load_model(tmp_path, dtype=dtype)
    assert low.decoder.token_embedding.weight.dtype == dtype
    assert torch.equal(low.decoder.token_embedding.weight, half.model.decoder.embed_tokens.weight)


def test_openai_pt_checkpoint(tmp_path, openai_tiny_en, tiny_en_dir, jfk_audio):
    mel = dw.log_mel_spectrogram(jfk_audio, 80, padding=dw.N_SAMPLES)[:, : dw.N_FRAMES][None]
    dims = {k: v for k, v in vars(openai_tiny_en.dims).items()}
    path = tmp_path / "tiny.en.pt"
    torch.save({"dims": dims, "model_state_dict": openai_tiny_en.state_dict()}, path)
    model = dw.load_model(path)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in openai_tiny_en.state_dict().items())
    tokens = torch.tensor([[50257, 50362, 400, 370]])
    seen = []
    hook = openai_tiny_en.decoder.ln.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        with torch.no_grad():
            ref = openai_tiny_en(mel, tokens)
            audio = model.encoder(mel)
            assert torch.equal(audio, openai_tiny_en.encoder(mel))
            assert torch.equal(model.decoder.hidden(tokens, audio), seen[0])
            assert torch.equal(model(mel, tokens), ref)  # outside a decode no half-precision copy: the same bits
    finally:
        hook.remove()


def test_own_checkpoint_round_trip_is_exact(tiny_en, tmp_path):
    import copy

    model = copy.deepcopy(tiny_en)
    with torch.no_grad():  # a "fine-tuned" dual model: gates open, branch moved
        for name, p in model.named_parameters():
            if dw.is_dual_parameter(name):
                p.add_(torch.randn_like(p) * 0.01)
    out = dw.save_model(model, tmp_path / "run", extra={"train_config": {"lr": 1e-5}})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "dualwhisper" and cfg["train_config"] == {"lr": 1e-5}
    assert (out / "vocab.json").exists() and (out / "generation_config.json").exists()
    back = dw.load_model(out)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dw.get_tokenizer(back).encode(" hello") == dw.get_tokenizer(tiny_en).encode(" hello")
    assert dw.Tokenizer.from_pretrained(out).n_vocab == 51864  # the folder alone says which vocabulary
    plain = dw.load_model(out, dual=False)
    assert not any(dw.is_dual_parameter(k) for k in plain.state_dict())
    # saving again over the same folder replaces it whole and keeps the tokenizer files
    dw.save_model(back, out)
    assert (out / "vocab.json").exists() and not list(tmp_path.glob("run.*"))


# -----------------------------------------------------------------------------
# failures: one clear line each


def _error(path, **kw):
    with pytest.raises(Exception) as info:
        dw.load_model(path, **kw)
    message = str(info.value)
    assert "\n" not in message
    return info.type, message


def test_missing_folder():
    kind, message = _error("./no/such/model")
    assert kind is FileNotFoundError and "no/such/model" in message


def test_not_a_whisper_checkpoint(tmp_path, tiny_en_dir):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shutil.copy(tiny_en_dir / "model.safetensors", tmp_path / "bert")
    assert "not Whisper" in _error(tmp_path / "bert")[1]

    from safetensors.torch import save_file

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tiny_en_dir / "config.json", other)
    save_file({"bert.embeddings.weight": torch.zeros(3, 3)}, str(other / "model.safetensors"))
    kind, message = _error(other)
    assert kind is ValueError and "not a Whisper checkpoint" in message and "bert.embeddings.weight" in message

    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(tmp_path / "empty")[1]
    (tmp_path / "x.pt").write_bytes(b"not a pickle")
    assert "not a readable PyTorch checkpoint" in _error(tmp_path / "x.pt")[1]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_truncated_or_corrupt_weights(tmp_path, tiny_en_dir, damage):
    for name in ("config.json", "generation_config.json", "vocab.json"):
        shutil.copy(tiny_en_dir / name, tmp_path)
    data = (tiny_en_dir / "model.safetensors").read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = bytes([data[0] ^ 0xFF]) + b"\xff" * 64 + data[65:]
    (tmp_path / "model.safetensors").write_bytes(data)
    kind, message = _error(tmp_path)
    assert kind is ValueError and "truncated or corrupt" in message and "model.safetensors" in message


def test_shape_mismatch_with_config(tmp_path, tiny_en_dir):
    for name in ("model.safetensors", "generation_config.json"):
        shutil.copy(tiny_en_dir / name, tmp_path)
    cfg = json.loads((tiny_en_dir / "config.json").read_text())
    cfg["num_mel_bins"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "encoder.conv1.weight" in _error(tmp_path)[1]


def test_hub_unreachable_says_how_to_use_a_local_folder(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    code = "import dualwhisper as dw\ntry:\n    dw.load_model('openai/whisper-small')\nexcept ConnectionError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    message = out.stdout.strip()
    assert "openai/whisper-small" in message and "local folder" in message and len(message.splitlines()) == 1


def test_loading_imports_no_compiler(tiny_en_dir):
    """Building the model on the meta device must not reach torch's compiler stack: normal_,
    empty_like and arithmetic on meta tensors import torch._dynamo and sympy, which made the
    first load_model in a process (and so `python sample.py`) take 2 to 3 s instead of 0.15 s."""
    code = ("import sys, dualwhisper as dw\n"
            f"model = dw.load_model({str(tiny_en_dir)!r})\n"
            "assert not any(p.is_meta for p in model.parameters())\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
