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
        gate_grad = sum(p.grad.abs().sum().item() for p in block.gate.parameters())
        assert (gate_grad > 0) == (branch2 == "fresh"), (gate, branch2, gate_grad)  # a copy: b - a = 0
    with torch.no_grad():
        for p in block.gate.parameters():
            p.add_(0.1)
        logits = model(jfk_mel, tokens)
    dw.save_model(model, tmp_path / "m")
    back = dw.load_model(tmp_path / "m")
    assert (back.dims.gate, back.dims.branch2) == (gate, "copy")
    with torch.no_grad():
        assert torch.equal(back(jfk_mel, tokens), logits)
    with pytest.raises(ValueError, match="trained with gate"):
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


def test_encoder_windows_on_cores_give_each_window_alone(tiny_en, jfk_mel, monkeypatch):
    """Several windows on a CPU: in threads of one core each where nothing needs gradients, one by
    one where the encoder trains; the same numbers as each window alone, and the thread count kept."""
    mel = torch.cat([jfk_mel, jfk_mel.flip(-1), jfk_mel * 0.5])
    threads, pools = torch.get_num_threads(), []
    pool = dw._thread_pool
    monkeypatch.setattr(dw, "_thread_pool", lambda n: pools.append(n) or pool(n))
    with torch.no_grad():
        alone = torch.cat([tiny_en.encoder(m[None]) for m in mel])
        together = tiny_en.encoder(mel)
    assert torch.equal(together, alone) and torch.get_num_threads() == threads
    assert pools == ([min(threads, 3)] if threads > 1 else [])
    out = tiny_en.encoder(mel[:2])  # gradients wanted: the windows in turn, in the graph
    assert out.requires_grad and torch.equal(out.detach(), alone[:2]) and len(pools) == (threads > 1)


def test_folded_cross_attention_matches_keys_and_values():
    """Training on fewer tokens than a head's dimensions folds the key and value projections into
    the queries and the output: the same outputs and gradients as projecting the audio."""
    torch.manual_seed(0)
    att = dw.MultiHeadAttention(384, 6)
    torch.nn.init.normal_(att.value.bias)  # a bias that matters
    x, xa = torch.randn(3, 10, 384, requires_grad=True), torch.randn(3, 1500, 384)
    params = [x, att.query.weight, att.key.weight, att.value.weight, att.value.bias, att.out.weight]
    folded = att(x, xa)  # 10 tokens < 64 dimensions a head, with autograd: folded
    unfolded = att(x, kv=att.kv(xa))
    assert (folded - unfolded).abs().max() < 1e-5 * unfolded.abs().max()
    g1 = torch.autograd.grad((folded * unfolded.detach()).sum(), params)
    g2 = torch.autograd.grad((unfolded * unfolded.detach()).sum(), params)
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-5 * b.abs().max()
    with torch.no_grad():  # without autograd the usual form, as openai-whisper computes it
        assert torch.equal(att(x, xa), att(x, kv=att.kv(xa)))


def tied_model(n_vocab=2100):
    """A small dual model whose vocabulary spans two 1024-token slices and a rest (_vocab_product)."""
    torch.manual_seed(0)
    dims = dw.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                              n_vocab=n_vocab, n_text_ctx=32, n_text_state=64, n_text_head=2, n_text_layer=2)
    return dw.Whisper(dims), torch.randint(0, n_vocab, (2, 5)), torch.randn(2, 1500, 64)


def test_tied_embedding_gradient_is_the_dense_one():
    """In training on a CPU the decoder's forward hands the output projection's dense gradient of
    the tied embedding to the lookup's backward, which adds its rows (_TiedGradient): the same
    gradient as the two uses' dense gradients summed by autograd, and dense for the optimiser."""
    model, tokens, xa = tied_model()
    weight = model.decoder.token_embedding.weight
    model.decoder(tokens, xa).square().mean().backward()
    tied = weight.grad.clone()
    weight.grad = None
    model.decoder.project(model.decoder.hidden(tokens, xa)).square().mean().backward()  # untied: autograd sums two gradients
    assert weight.grad.layout == torch.strided and tied.layout == torch.strided
    # float32 rounding: the forward's product over 1024-token slices sums in another order
    assert (tied - weight.grad).abs().max() <= 1e-5 * weight.grad.abs().max()
    assert tied[tokens.flatten()].abs().sum() > 0


def test_tied_gradient_memory_is_reused_only_when_no_one_holds_it():
    """The tied embedding's gradient is written into memory kept from the last step once the
    optimiser has let go of it (a fresh 80 MB faults in its pages on every step), and never into a
    gradient that something still holds, nor while gradients accumulate."""
    model, tokens, xa = tied_model()
    weight = model.decoder.token_embedding.weight

    def backward():
        model.decoder(tokens, xa).square().mean().backward()

    backward()
    first, kept = weight.grad.clone(), weight.grad.data_ptr()
    weight.grad = None  # as zero_grad(set_to_none=True)
    backward()
    assert weight.grad.data_ptr() == kept and torch.equal(weight.grad, first)  # the same memory, the same gradient
    held = weight.grad
    weight.grad = None
    backward()
    assert weight.grad.data_ptr() != kept and torch.equal(held, first)  # a gradient still held is left alone
    backward()  # a second micro-step adds to the first
    assert (weight.grad - 2 * first).abs().max() <= 1e-6 * first.abs().max()


def test_half_precision_embedding_product_only_where_it_is_exact(tiny_en):
    """Decoding on a CPU projects with fbgemm's product of the embedding stored in float16 only
    when every value of it is a float16 number (official weights are): then the logits are the
    float32 ones up to the order of the sums. A weight that is not, or that changes, is noticed."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm on this CPU")
    model = copy.deepcopy(tiny_en)
    dec = model.decoder
    dec.half_products = True  # as while decoding
    x = torch.randn(3, 384)
    with torch.no_grad():
        float32 = x @ dec.token_embedding.weight.t()
        assert len(dec.half_embedding()) == 4  # 51,864 tokens in slices of 16,384
        assert (dec.project(x) - float32).abs().max() <= 1e-5 * float32.abs().max()
        dec.token_embedding.weight[5, 7] += 1e-4  # no longer a float16 number, and a new version
        assert dec.half_embedding() == []
        fallback = dec.project(x)
        assert torch.equal(fallback.argmax(-1), (x @ dec.token_embedding.weight.t()).argmax(-1))
        dec.token_embedding.weight[5, 7] = 0.5  # exact again
        assert len(dec.half_embedding()) == 4
        assert torch.allclose(dec.project(x), x @ dec.token_embedding.weight.t(), rtol=0, atol=1e-5 * float32.abs().max())
    with torch.enable_grad():  # training: the float32 product, with autograd
        assert dec.project(x).requires_grad
    # a fused AdamW step changes every value without bumping the weight's version: no stale copy
    weight = dec.token_embedding.weight
    optimizer = torch.optim.AdamW([weight], lr=1e-3, fused=True)
    weight.grad = torch.randn_like(weight)
    optimizer.step()  # (torch 2.13 leaves weight._version as it was)
    with torch.no_grad():
        after = x @ weight.t()
        assert (dec.project(x) - after).abs().max() <= 1e-5 * after.abs().max()


def test_half_precision_linears_only_while_decoding(tiny_en, jfk_audio, monkeypatch):
    """From a model's second decode on, decoding on a CPU multiplies each step's one row by
    half-precision copies of the decoder's linear layers (official weights are all float16
    numbers); every such product is checked here against the float32 one of the layer's current
    weights, also after a fused AdamW step, which changes a bias without bumping its version, and
    after the bias is replaced. A model's first decode, and anything outside a decode, has no
    copy; the text is the float32 decode's."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm on this CPU")
    model = copy.deepcopy(tiny_en)
    model.decoder._decoded = False  # as loaded
    layer = model.decoder.blocks[1].mlp[0]
    seen = []

    def check(module, inputs, output):
        x = inputs[0]
        if x.numel() == x.shape[-1]:
            seen.append(bool(module.half_copy))
            expected = torch.nn.functional.linear(x, module.weight, module.bias)
            assert (output - expected).abs().max() <= 1e-5 * expected.abs().max()

    layer.register_forward_hook(check)
    mel = dw.log_mel_spectrogram(dw.pad_or_trim(jfk_audio))
    first = dw.decode(model, mel, temperature=0.0)
    assert seen and not any(seen), "a model's first decode makes no copies"
    seen.clear()
    half = dw.decode(model, mel, temperature=0.0)
    assert seen and all(seen) and layer.half_copy is None and not model.decoder.half_products
    assert half.tokens == first.tokens
    optimizer = torch.optim.AdamW([layer.bias], lr=1e-2, fused=True)
    layer.bias.grad = torch.randn_like(layer.bias)
    optimizer.step()  # (leaves the bias's version as it was)
    seen.clear()
    dw.decode(model, mel, temperature=0.0)
    assert seen and all(seen)
    layer.bias = torch.nn.Parameter(layer.bias.detach() + 0.01)  # a new bias for the same weight
    seen.clear()
    dw.decode(model, mel, temperature=0.0)
    assert seen and all(seen)
    monkeypatch.setattr(dw, "_half_copy", lambda *args, **kwargs: [])  # the float32 products throughout
    float32 = dw.decode(tiny_en, mel, temperature=0.0)
    assert half.tokens == float32.tokens and half.avg_logprob == pytest.approx(float32.avg_logprob, abs=1e-5)


def test_loss_from_the_target_positions_only_is_the_full_one():
    """The training loss projects only the positions with a target: the same loss, mean and sum,
    and the same gradients as the cross-entropy of all positions' logits with -100 ignored."""
    torch.manual_seed(0)
    dims = dw.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                              n_vocab=300, n_text_ctx=32, n_text_state=64, n_text_head=2, n_text_layer=2)
    model = dw.Whisper(dims)
    torch.nn.init.normal_(model.decoder.blocks[0].gate.weight)  # both branches in play
    mel, tokens = torch.randn(2, 80, 3000), torch.randint(0, 300, (2, 7))
    targets = torch.randint(0, 300, (2, 7))
    targets[:, 0] = -100  # the prompt
    targets[1, 4:] = -100  # padding
    for reduction in ("mean", "sum"):
        model.zero_grad()
        loss = model(mel, tokens, targets, reduction=reduction)
        loss.backward()
        mine = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        full = torch.nn.functional.cross_entropy(model(mel, tokens).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
        full.backward()
        assert abs(loss.item() - full.item()) <= 1e-6 * abs(full.item())
        for n, p in model.named_parameters():
            assert (mine[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-12, n


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
    model = dw._empty_model(dims)
    ours = model.state_dict()
    hf_state = {k: v for k, v in hf.state_dict().items() if k != dw.HF_TIED_OUTPUT}  # tied: files leave it out
    renamed = dw._remap(hf_state, dw.hf_key_map(dims), name)
    left = set(ours) - set(renamed)
    assert left and all(dw.is_dual_parameter(k) for k in left)
    for k, v in renamed.items():
        assert ours[k].shape == v.shape, k
    n_plain = sum(v.numel() for k, v in ours.items() if not dw.is_dual_parameter(k))
    n_hf = sum(v.numel() for k, v in hf_state.items() if k != dw.HF_TIED_OUTPUT)
    assert n_plain == n_hf


def test_silent_end_of_a_window_cut_from_the_convolutions_gives_the_same_bits(tiny_en):
    """AudioEncoder.front cuts the constant log-mel run of a padded window out of the convolutions'
    input and puts the columns back as copies: the full convolutions' bits, for clips from none
    to 30 s, on one thread and on two, and the encoder's output too."""
    import numpy as np
    import torch.nn.functional as F

    enc = tiny_en.encoder
    rng = np.random.default_rng(0)

    def window(seconds):
        audio = torch.from_numpy(rng.standard_normal(int(seconds * dw.SAMPLE_RATE)).astype(np.float32) * 0.1)
        return dw.log_mel_spectrogram(audio, padding=dw.N_SAMPLES)[:, :dw.N_FRAMES][None]

    dw.AudioEncoder.compact_front = None  # as in a new process: the first cut window is checked in full
    with torch.no_grad():
        enc.front(window(3.0))
    if dw.AudioEncoder.compact_front is False:
        pytest.skip("this CPU's oneDNN sums the cut input in another order: the cut is off here")
    assert dw.AudioEncoder.compact_front is True
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for seconds in (0.0, 0.01, 0.5, 1.0, 2.0, 2.37, 3.3, 5.0, 11.0, 17.77, 25.0, 29.0, 29.9, 30.0):
                mel = window(seconds)
                with torch.no_grad():
                    full = F.gelu(enc.conv2(F.gelu(enc.conv1(mel))))
                    assert torch.equal(enc.front(mel), full), (n, seconds)
    finally:
        torch.set_num_threads(threads)
    mel = window(2.5)
    with torch.no_grad():
        cut = enc(mel)
        dw.AudioEncoder.compact_front = False
        whole = enc(mel)
        dw.AudioEncoder.compact_front = True
    assert torch.equal(cut, whole)
