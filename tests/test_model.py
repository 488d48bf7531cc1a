"""The model against the references: logits on real weights and audio, the dual branch at step 0
and after a few optimiser steps, dimensions of every official size."""

import copy

import pytest
import torch

import dualwhisper as dw
from conftest import need

TOKENS = [50257, 50362, 400, 370, 452, 7404, 4498, 1265, 407, 437, 534, 1499, 460, 466, 329, 345]


@pytest.fixture(scope="module")
def jfk_mel(jfk_audio):
    return dw.log_mel_spectrogram(jfk_audio, 80, padding=dw.N_SAMPLES)[:, : dw.N_FRAMES][None]


def test_logits_match_openai_whisper_and_transformers(tiny_en_dir, tiny_en, tiny_en_plain, openai_tiny_en, jfk_mel):
    transformers = need("transformers")
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_en_dir, torch_dtype=torch.float32).eval()
    tokens = torch.tensor([TOKENS])
    with torch.no_grad():
        ref = openai_tiny_en(jfk_mel, tokens)
        ref_hf = hf(input_features=jfk_mel, decoder_input_ids=tokens).logits
        dual = tiny_en(jfk_mel, tokens)
        plain = tiny_en_plain(jfk_mel, tokens)
    assert dual.shape == (1, len(TOKENS), 51864)
    assert ref.abs().max() > 1  # real logits, not zeros
    for ours in (dual, plain):
        assert (ours - ref).abs().max().item() < 1e-4
        assert (ours - ref_hf).abs().max().item() < 1e-4
    # the transcript's own tokens are the references' argmax too (teacher forcing)
    assert torch.equal(dual.argmax(-1), ref_hf.argmax(-1))


def test_greedy_transcript_matches_openai_whisper(tiny_en, tiny_en_plain, openai_tiny_en, jfk_mel):
    whisper = need("whisper")
    tok = dw.get_tokenizer(tiny_en)
    ref = whisper.decode(openai_tiny_en, jfk_mel[0], whisper.DecodingOptions(without_timestamps=True, fp16=False, language="en"))
    for model in (tiny_en, tiny_en_plain):
        tokens = dw.greedy_decode(model, jfk_mel, tok)[0]
        assert tokens == ref.tokens
        assert tok.decode(tokens).strip() == ref.text
    assert "ask not what your country can do for you" in ref.text


def test_dual_equals_plain_at_step_0_and_exposes_gates_and_attention(tiny_en, tiny_en_plain, jfk_mel):
    tokens = torch.tensor([TOKENS[:6]])
    with torch.no_grad():
        plain = tiny_en_plain(jfk_mel, tokens)
        assert torch.equal(tiny_en(jfk_mel, tokens), plain)  # exactly: the gate is zero
        logits, details = tiny_en.analyse(jfk_mel, tokens)  # explicit softmax instead of SDPA
        assert (logits - plain).abs().max().item() < 1e-4
        _, plain_details = tiny_en_plain.analyse(jfk_mel, tokens)
    assert len(details) == tiny_en.dims.n_text_layer
    for layer in details:
        assert layer["gate"].shape == (1, 6) and torch.all(layer["gate"] == 0)
        for key in ("cross_attn", "cross_attn2"):
            w = layer[key]
            assert w.shape == (1, 6, 6, 1500)
            assert torch.allclose(w.sum(-1), torch.ones(1, 6, 6))
        assert not torch.allclose(layer["cross_attn"], layer["cross_attn2"])  # two different views
    assert plain_details[0]["gate"] is None and plain_details[0]["cross_attn2"] is None


@pytest.mark.parametrize("gate", dw.GATES)
def test_gate_and_branch2_variants_exact_at_init_learn_and_load_back(gate, tiny_en_dir, tiny_en_plain, jfk_mel, tmp_path):
    """Every variant computes the official logits at init, except the sigmoid gate over a fresh
    branch (g = 1/2 of a random branch); one step moves the gate where it has a gradient (not
    over a copied branch through a zero tanh gate: b - a = 0); saved, it loads back as itself."""
    tokens = torch.tensor([TOKENS[:6]])
    targets = torch.tensor([[-100, 400, 370, 452, 7404, 4498]])
    with torch.no_grad():
        plain = tiny_en_plain(jfk_mel, tokens)
    for branch2 in dw.BRANCH2:
        torch.manual_seed(0)
        model = dw.load_model(tiny_en_dir, dual=True, gate=gate, branch2=branch2)
        with torch.no_grad():
            logits = model(jfk_mel, tokens)
        exact = not (gate == "sigmoid" and branch2 == "fresh")
        assert torch.equal(logits, plain) == exact, (gate, branch2)
        if not exact:
            assert (logits - plain).abs().max() > 1e-2
        block = model.decoder.blocks[0]
        assert (block.cross_attn2.query.weight == block.cross_attn.query.weight).all() == (branch2 == "copy")
        model(jfk_mel, tokens, targets).backward()
        gate_params = [block.gate] if gate == "layer" else list(block.gate.parameters())
        gate_grad = sum(p.grad.abs().sum().item() for p in gate_params)
        assert (gate_grad > 0) == (branch2 == "fresh"), (gate, branch2, gate_grad)  # a copy: b - a = 0
        with torch.no_grad():  # decoding skips the second branch exactly while the gate is closed, and gives the same logits
            cache = dw.KVCache(model, model.encoder(jfk_mel))
            assert all((layer[1] is None) == (gate != "sigmoid") for layer in cache.cross)
            assert (model.decoder(tokens, kv_cache=cache) - logits).abs().max() < 1e-4
    with torch.no_grad():
        for p in gate_params:
            p.add_(0.1)
        logits = model(jfk_mel, tokens)
    dw.save_model(model, tmp_path / "m")
    back = dw.load_model(tmp_path / "m")
    assert (back.dims.gate, back.dims.branch2) == (gate, "copy")
    with torch.no_grad():
        assert torch.equal(back(jfk_mel, tokens), logits)
    with pytest.raises(ValueError, match="cannot load as"):
        dw.load_model(tmp_path / "m", gate="tanh" if gate != "tanh" else "layer")


def _train_steps(model, mel, tokens, steps, lr=1e-5, dual_lr=1e-3, freeze_encoder=False):
    targets = torch.cat([tokens[:, 1:], torch.full((tokens.shape[0], 1), -100)], dim=1)
    targets[:, 0] = -100  # the prompt is given, not predicted
    if freeze_encoder:
        model.encoder.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in named if not dw.is_dual_parameter(n)], "lr": lr},
                             {"params": [p for n, p in named if dw.is_dual_parameter(n)], "lr": dual_lr}], weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(mel, tokens, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_new_parts_learn_from_the_first_steps(tiny_en, tiny_en_plain, jfk_mel):
    model = copy.deepcopy(tiny_en)
    jfk_mel = jfk_mel[:, :, :1100]  # the speech only (11 s): the encoder takes shorter inputs too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.tensor([TOKENS])

    # step 0: the gate already has a gradient (the secondary branch is a different view of the audio)
    targets = torch.cat([tokens[:, 1:], torch.tensor([[-100]])], dim=1)
    model(jfk_mel, tokens, targets).backward()
    gate_grads = [b.gate.weight.grad.abs().sum().item() for b in model.decoder.blocks]
    assert all(g > 0 for g in gate_grads)
    model.zero_grad()

    model, losses = _train_steps(model, jfk_mel, tokens, steps=3, freeze_encoder=True)
    after = model.state_dict()
    for i, block in enumerate(model.decoder.blocks):
        p = f"decoder.blocks.{i}."
        assert not torch.equal(after[p + "gate.weight"], before[p + "gate.weight"])
        for name in ("cross_attn2.query.weight", "cross_attn2.key.weight", "cross_attn2.value.weight", "cross_attn2.out.weight"):
            assert not torch.equal(after[p + name], before[p + name]), name
    for k, v in after.items():  # frozen encoder: bit-identical
        if k.startswith("encoder."):
            assert torch.equal(v, before[k]), k
    with torch.no_grad():
        logits, details = model.analyse(jfk_mel, tokens)
        plain = tiny_en_plain(jfk_mel, tokens)
    assert (logits - plain).abs().max().item() > 1e-2  # moved away from plain Whisper
    assert all(layer["gate"].abs().max() > 0 for layer in details)  # the gates have opened
    assert losses[-1] < losses[0]


# Official sizes as their Hugging Face configs give them: (d_model, encoder layers, decoder layers,
# heads, mel bins, vocabulary).
OFFICIAL = {
    "tiny.en": (384, 4, 4, 6, 80, 51864), "tiny": (384, 4, 4, 6, 80, 51865),
    "base.en": (512, 6, 6, 8, 80, 51864), "base": (512, 6, 6, 8, 80, 51865),
    "small.en": (768, 12, 12, 12, 80, 51864), "small": (768, 12, 12, 12, 80, 51865),
    "medium.en": (1024, 24, 24, 16, 80, 51864), "medium": (1024, 24, 24, 16, 80, 51865),
    "large-v1": (1280, 32, 32, 20, 80, 51865), "large-v2": (1280, 32, 32, 20, 80, 51865),
    "large-v3": (1280, 32, 32, 20, 128, 51866), "large-v3-turbo": (1280, 32, 4, 20, 128, 51866),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_every_official_size_builds_and_maps_key_for_key(name):
    transformers = need("transformers")
    d, enc, dec, heads, mels, vocab = OFFICIAL[name]
    cfg = transformers.WhisperConfig(
        d_model=d, encoder_layers=enc, decoder_layers=dec, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, num_mel_bins=mels, vocab_size=vocab)
    with torch.device("meta"):
        hf = transformers.WhisperForConditionalGeneration(cfg)
    dims = dw.ModelDimensions.from_hf_config(cfg.to_dict())
    assert dims.num_languages == (100 if vocab == 51866 else 99)
    model = dw.empty_model(dims)
    ours = model.state_dict()
    hf_state = {k: v for k, v in hf.state_dict().items() if k != dw.HF_TIED_OUTPUT}  # tied: files leave it out
    renamed = dw.remap(hf_state, dw.hf_key_map(dims), name)
    left = set(ours) - set(renamed)
    assert left and all(dw.is_dual_parameter(k) for k in left)
    for k, v in renamed.items():
        assert ours[k].shape == v.shape, k
    n_plain = sum(v.numel() for k, v in ours.items() if not dw.is_dual_parameter(k))
    n_hf = sum(v.numel() for k, v in hf_state.items() if k != dw.HF_TIED_OUTPUT)
    assert n_plain == n_hf
