"""
dualwhisper: OpenAI's Whisper in one file, with a second cross-attention branch in every decoder
layer fused with the first by a learned gate.

Sections: dimensions, the model, audio front end, tokenizer, loading and saving, noise,
decoding, word timestamps, transcription, text normalisation, and at the end two optional
decoding speed-ups that serve one kind of device each (x86 CPUs; CUDA graphs on GPUs).
The names follow openai-whisper (`attn`, `cross_attn`, `attn_ln`, `mlp`, `ln_post`, ...) so that its
state dicts load as they are; the new parts are `cross_attn2`, `cross_attn2_ln` and `gate`.
"""

import argparse
import copy
import json
import math
import os
import string
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# dimensions




@dataclass
class ModelDimensions:
    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4
    n_vocab: int = 51864
    n_text_ctx: int = 448
    n_text_state: int = 384
    n_text_head: int = 6
    n_text_layer: int = 4
    dual: bool = True  # a second cross-attention branch and a gate in every decoder layer
    gate: str = "tanh"  # how the branches are fused: one of GATES
    branch2: str = "fresh"  # the second branch at the start: "fresh" (newly initialised) or "copy" (of the first)

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}: expected one of {', '.join(GATES)}")
        if self.branch2 not in BRANCH2:
            raise ValueError(f"unknown branch2 {self.branch2!r}: expected one of {', '.join(BRANCH2)}")

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model dimensions {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf_config(cls, cfg, **kwargs):
        """Dimensions from a Hugging Face `config.json` of a Whisper model."""
        d = cfg["d_model"]
        odd = {k: cfg.get(k) for k, want in (("encoder_ffn_dim", 4 * d), ("decoder_ffn_dim", 4 * d),
               ("activation_function", "gelu"), ("scale_embedding", False)) if cfg.get(k, want) != want}
        if odd:
            raise ValueError(f"Whisper config with settings this model does not implement: {odd}")
        return cls(
            n_mels=cfg["num_mel_bins"], n_audio_ctx=cfg["max_source_positions"],
            n_audio_state=cfg["d_model"], n_audio_head=cfg["encoder_attention_heads"],
            n_audio_layer=cfg["encoder_layers"], n_vocab=cfg["vocab_size"],
            n_text_ctx=cfg["max_target_positions"], n_text_state=cfg["d_model"],
            n_text_head=cfg["decoder_attention_heads"], n_text_layer=cfg["decoder_layers"], **kwargs)

    @property
    def is_multilingual(self):
        return self.n_vocab >= 51865

    @property
    def num_languages(self):
        return self.n_vocab - 51765 - int(self.is_multilingual)


# -----------------------------------------------------------------------------
# the model: openai-whisper's, plus the second cross-attention branch and its gate


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, as in Whisper."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type(x.dtype)


class Linear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv1d(nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def sinusoids(length, channels, max_timescale=10000):
    """Whisper's fixed sinusoidal positions for the encoder: sines then cosines."""
    assert channels % 2 == 0
    inv = torch.exp(-math.log(max_timescale) / (channels // 2 - 1) * torch.arange(channels // 2, device="cpu"))
    t = torch.arange(length, device="cpu")[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def attention(q, k, v, mask=None, need_weights=False):
    """Scaled dot-product attention of q (B, H, T, D) to k, v (W, H, S, D). When decoding with
    beams, W < B: each window's keys and values are shared by its B // W consecutive rows, whose
    queries then attend together as one longer query (no copy of the keys per beam).
    mask: None, "causal", or a boolean (B, 1, T, S), True where a query may look.
    Returns the output (B, H, T, D) and, when need_weights, the weights (B, H, T, S) in float32."""
    B, H, T, D = q.shape
    if need_weights:
        att = (q @ k.transpose(-2, -1)).float() * D ** -0.5
        if isinstance(mask, str):
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - T)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = att.softmax(dim=-1)
        return att.to(q.dtype) @ v, att
    if k.shape[0] < B:  # beams sharing their window's keys and values
        G = B // k.shape[0]
        q = q.view(-1, G, H, T, D).transpose(1, 2).reshape(-1, H, G * T, D)
        y = F.scaled_dot_product_attention(q, k, v)
        return y.view(-1, H, G, T, D).transpose(1, 2).reshape(B, H, T, D), None
    causal = isinstance(mask, str)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal), None


class MultiHeadAttention(nn.Module):
    """Self-attention, or cross-attention over the audio features. The key projection has no
    bias, as in Whisper."""

    def __init__(self, n_state, n_head):
        super().__init__()
        self.n_head = n_head
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)

    def heads(self, x):  # (B, T, C) -> (B, H, T, D)
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def kv(self, xa):
        """Keys and values (B, H, S, D) of the audio features xa (B, S, C)."""
        return self.heads(self.key(xa)), self.heads(self.value(xa))

    def forward(self, x, xa=None, mask=None, kv_cache=None, offset=0, need_weights=False):
        """x (B, T, C) -> (B, T, C), and the attention weights (B, H, T, S) if need_weights.

        Cross-attention: over audio features xa (B, S, C), or when decoding over their keys and
        values xa = (k, v), computed once per window by `kv`. Self-attention (xa None): with
        kv_cache = (k, v) buffers (B, H, n_ctx, D), this step's keys and values are written at
        positions offset..offset+T, and the queries attend to every position written so far."""
        B, T, C = x.shape
        q = self.heads(self.query(x))
        if isinstance(xa, tuple):
            k, v = xa
        elif xa is not None:
            k, v = self.kv(xa)
        else:
            k, v = self.heads(self.key(x)), self.heads(self.value(x))
            if kv_cache is not None:
                kv_cache[0][:, :, offset:offset + T] = k
                kv_cache[1][:, :, offset:offset + T] = v
                k, v = kv_cache[0][:, :, :offset + T], kv_cache[1][:, :, :offset + T]
        y, weights = attention(q, k, v, mask, need_weights)
        return self.out(y.transpose(1, 2).reshape(B, T, C)), weights


GATES = ("tanh", "sigmoid", "channel", "layer")  # ModelDimensions.gate
BRANCH2 = ("fresh", "copy")  # ModelDimensions.branch2


class ResidualAttentionBlock(nn.Module):
    """A pre-LN transformer block. Decoder blocks add cross-attention over the audio and, when
    dual, a second cross-attention branch fused with the first by a gate:

        a = cross_attn(cross_attn_ln(x), audio)          primary branch (official weights)
        b = cross_attn2(cross_attn2_ln(x), audio)        secondary branch (new)
        g = tanh(gate([cross_attn_ln(x), a, b]))         one weight per token, (B, T, 1)
        x = x + (1 - g) * a + g * b

    Why this form. The gate sees the decoder state and both branch outputs, so it can learn per
    token when the second view of the audio is worth more (noisy frames, a second talker).
    `gate` starts at zero weight and bias, so g = 0 and the block computes exactly what the
    official Whisper computes, whatever the secondary branch holds. Any exact-at-init fusion of
    the form g * d has one factor identically zero at init and so one factor without gradient at
    step 0; we choose which. A convex mix over a copied branch (d = b - a = 0) starves the gate,
    whose gradient grows only as the copies drift apart, and keeps the copies symmetric. Here the
    secondary branch is freshly initialised, so b - a is a real, input-dependent signal and the
    gate gets its full gradient from the first step: after one optimiser step g != 0 and the
    branch gets gradient g * dL/dx. Adam normalises that gradient, so the branch moves at full
    speed as soon as the gate has opened a little; a larger learning rate on the new parts
    (train.py --dual_lr_mult) opens the gate within tens of steps.

    The other gates, for comparison (ModelDimensions.gate): "sigmoid", the convex mix
    g = sigmoid(gate([...])) (exact at init only over a copied branch, branch2="copy");
    "channel", the tanh gate with one weight per channel, (B, T, C); "layer", one learned scalar
    per layer, g = tanh(gate), zero at init.
    """

    def __init__(self, n_state, n_head, cross_attention=False, dual=False, gate="tanh"):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        self.dual = cross_attention and dual
        if self.dual:
            self.gate_kind = gate
            self.cross_attn2 = MultiHeadAttention(n_state, n_head)
            self.cross_attn2_ln = LayerNorm(n_state)
            self.gate = nn.Parameter(torch.zeros(1)) if gate == "layer" else Linear(3 * n_state, n_state if gate == "channel" else 1)
            self.reset_dual_parameters()
        n_mlp = n_state * 4
        self.mlp = nn.Sequential(Linear(n_state, n_mlp), nn.GELU(), Linear(n_mlp, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def reset_dual_parameters(self):
        """The second branch freshly initialised, the gate at zero."""
        for m in (self.cross_attn2, self.cross_attn2_ln):
            for sub in m.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
        for p in ([self.gate] if self.gate_kind == "layer" else self.gate.parameters()):
            nn.init.zeros_(p)

    def copy_primary_branch(self):
        """The second branch set to a copy of the first (branch2="copy")."""
        self.cross_attn2.load_state_dict(self.cross_attn.state_dict())
        self.cross_attn2_ln.load_state_dict(self.cross_attn_ln.state_dict())

    def gate_is_closed(self):
        """True when the gate is exactly zero whatever the input (the tanh gates as initialised):
        the second branch then adds nothing, and decoding skips it."""
        if self.gate_kind == "sigmoid":
            return False
        return not any(p.any() for p in ([self.gate] if self.gate_kind == "layer" else self.gate.parameters()))

    def fuse(self, h, a, b):
        """The gate g and the fused branches (1 - g) * a + g * b."""
        if self.gate_kind == "layer":
            g = torch.tanh(self.gate).to(a.dtype)
        else:
            g = self.gate(torch.cat([h, a, b], dim=-1))  # (B, T, 1) or (B, T, C)
            g = torch.sigmoid(g) if self.gate_kind == "sigmoid" else torch.tanh(g)
        return g, a + g * (b - a)

    def cross_kv(self, xa):
        """Cross-attention keys and values of each branch for a batch of windows, computed once
        for decoding; None for the second branch while its gate is closed."""
        branches = [self.cross_attn.kv(xa), self.cross_attn2.kv(xa) if self.dual and not self.gate_is_closed() else None]
        # each head's (S, D) block contiguous: every decoding step streams all of them
        return [None if kv is None else (kv[0].contiguous(), kv[1].contiguous()) for kv in branches]

    def forward(self, x, xa=None, mask=None, kv_cache=None, offset=0, details=None):
        """x (B, T, C); xa: audio features (B, S, C) for decoder blocks. When decoding, xa is None
        and kv_cache is this layer's (self-attention buffers, [cross keys and values of each
        branch]) from a KVCache. details: a list that gets this layer's cross-attention weights
        and gate values (analysis, plots, word timestamps)."""
        self_kv, cross = kv_cache if kv_cache is not None else (None, (xa, xa))
        x = x + self.attn(self.attn_ln(x), mask=mask, kv_cache=self_kv, offset=offset)[0]
        if self.cross_attn is not None:
            want = details is not None
            h = self.cross_attn_ln(x)
            a, wa = self.cross_attn(h, cross[0], need_weights=want)
            g = wb = None
            if self.dual and cross[1] is not None:  # None: a closed gate, skipped when decoding
                b, wb = self.cross_attn2(self.cross_attn2_ln(x), cross[1], need_weights=want)
                g, a = self.fuse(h, a, b)
            if want:
                gate = None if not self.dual else a.new_zeros(a.shape[:2]) if g is None else g.float().mean(-1).expand(a.shape[:2])
                details.append({"cross_attn": wa, "cross_attn2": wb, "gate": gate})
            x = x + a
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, n_mels, n_ctx, n_state, n_head, n_layer):
        super().__init__()
        self.conv1 = Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state).to(torch.get_default_device()))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = LayerNorm(n_state)
        self.checkpointing = False  # recompute each block's activations in the backward pass

    def forward(self, x):
        """x: log-mel (B, n_mels, 2 * n_ctx) -> audio features (B, n_ctx, n_state)."""
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = x.permute(0, 2, 1)  # (B, n_ctx, n_state)
        if x.shape[1] > self.positional_embedding.shape[0]:
            raise ValueError(f"audio of {x.shape[1]} positions is longer than the encoder's {self.positional_embedding.shape[0]}")
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab, n_ctx, n_state, n_head, n_layer, dual, gate="tanh"):
        super().__init__()
        # random starts of standard deviation 1 and 0.01, drawn uniformly: normal_ on the meta
        # device, where load_model builds the model, imports torch's compiler (seconds a start)
        self.token_embedding = nn.Embedding(n_vocab, n_state, _weight=torch.empty(n_vocab, n_state).uniform_(-3 ** 0.5, 3 ** 0.5))
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state).uniform_(-0.01 * 3 ** 0.5, 0.01 * 3 ** 0.5))
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(n_state, n_head, cross_attention=True, dual=dual, gate=gate) for _ in range(n_layer)])
        self.ln = LayerNorm(n_state)
        self.checkpointing = False

    def forward(self, tokens, xa=None, kv_cache=None, offset=0, details=None):
        """tokens (B, T) at positions offset..offset+T; xa: audio features (B, S, C), or None when
        kv_cache (a KVCache) holds the cross-attention keys and values. Returns float32 logits (B, T, n_vocab)."""
        return self.project(self.hidden(tokens, xa, kv_cache, offset, details))

    def hidden(self, tokens, xa=None, kv_cache=None, offset=0, details=None):
        """The final normalised states (B, T, C), before the output projection (decoding projects
        only the positions it needs)."""
        T = tokens.shape[-1]
        # several tokens at once start at position 0 (training, a prompt); decoding goes on one at a time
        pos, mask = self.positional_embedding[offset:offset + T], "causal" if T > 1 else None
        if kv_cache is not None and kv_cache.pad is not None:  # rows left-padded to a common prompt length
            pos, mask = kv_cache.positions(offset, T)
            pos = self.positional_embedding[pos]
        x = self.token_embedding(tokens) + pos
        x = x.to(xa.dtype if xa is not None else kv_cache.dtype if kv_cache is not None else x.dtype)
        for i, block in enumerate(self.blocks):
            layer_cache = None if kv_cache is None else (kv_cache.self_kv[i], kv_cache.cross[i])
            if self.checkpointing and self.training and kv_cache is None and details is None:
                x = torch.utils.checkpoint.checkpoint(block, x, xa, mask, use_reentrant=False)
            else:
                x = block(x, xa, mask=mask, kv_cache=layer_cache, offset=offset, details=details)
        return self.ln(x)

    def project(self, x):
        """Float32 logits (..., n_vocab) of final states x (..., C): the output is tied to the embedding."""
        return (x @ self.token_embedding.weight.to(x.dtype).t()).float()


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer,
                                   dims.dual, dims.gate)
        self.source_dir = None  # folder with tokenizer and generation files, set by load_model
        self.generation_config = {}

    def embed_audio(self, mel):
        return self.encoder(mel)

    def logits(self, tokens, audio_features):
        return self.decoder(tokens, audio_features)

    def forward(self, mel, tokens, targets=None, reduction="mean"):
        """mel (B, n_mels, frames), tokens (B, T) -> logits (B, T, n_vocab); with targets (B, T),
        where -100 marks positions to ignore, the cross-entropy instead: its mean over the target
        tokens, or with reduction="sum" their sum (train.py divides by the global batch's count)."""
        logits = self.decoder(tokens, self.encoder(mel))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)

    def analyse(self, mel, tokens):
        """Logits plus, per decoder layer, a dict of the gate values (B, T) and both branches'
        cross-attention weights (B, H, T, S): for plots, analysis and word timestamps."""
        details = []
        logits = self.decoder(tokens, self.encoder(mel), details=details)
        return logits, details

    @property
    def is_multilingual(self):
        return self.dims.is_multilingual

    @property
    def num_languages(self):
        return self.dims.num_languages

    def dual_parameter_names(self):
        """Names of the new parameters (second cross-attention branch, its norm, the gate)."""
        return [n for n, _ in self.named_parameters() if is_dual_parameter(n)]

    def gradient_checkpointing(self, enabled=True):
        self.encoder.checkpointing = self.decoder.checkpointing = enabled


def is_dual_parameter(name):
    return any(part in name.split(".") for part in ("cross_attn2", "cross_attn2_ln", "gate"))


class KVCache:
    """The decoder's explicit cache for one batch of audio windows: per layer, the self-attention
    keys and values in preallocated (B, H, n_ctx, D) tensors written at their positions, and the
    cross-attention keys and values of each branch, computed once from the audio features.
    The self-attention slots start empty: a query reads only positions up to its own, all
    written by then."""

    def __init__(self, model, audio_features, n_ctx=None):
        n_ctx = n_ctx or model.dims.n_text_ctx
        B, _, C = audio_features.shape
        H = model.dims.n_text_head
        self.dtype = audio_features.dtype
        self.cross = [block.cross_kv(audio_features) for block in model.decoder.blocks]  # per layer: [(k, v), (k, v) or None]
        shape = (B, H, n_ctx, C // H)
        self.self_kv = [(audio_features.new_empty(shape), audio_features.new_empty(shape)) for _ in model.decoder.blocks]
        self.pad = None  # (B,) left-padding slots per row, when rows hold prompts of different lengths

    def positions(self, offset, T):
        """For left-padded rows: the positional index of slots offset..offset+T (B, T), and the
        mask (B, 1, T, offset+T) of the keys each may see: none of the padding, which sees itself."""
        slots = torch.arange(offset, offset + T, device=self.pad.device)
        pos = (slots - self.pad[:, None]).clamp(min=0)
        keys = torch.arange(offset + T, device=self.pad.device)
        mask = (keys <= slots[:, None]) & ((keys >= self.pad[:, None, None]) | (keys == slots[:, None]))
        return pos, mask[:, None]

    def reorder(self, index, cross=True):
        """Keep batch rows `index`: beams (cross=False: the windows stay, shared by their beams), or
        rows leaving a batch of one row per window (cross=True)."""
        self.self_kv = [(k[index], v[index]) for k, v in self.self_kv]
        if cross:
            self.cross = [[None if kv is None else (kv[0][index], kv[1][index]) for kv in layer] for layer in self.cross]
        if self.pad is not None:
            self.pad = self.pad[index]

    def rows(self, index, n_ctx, group=1):
        """A new cache for windows `index` of this one, each decoded as `group` consecutive rows
        (beams or samples): those windows' cross-attention keys and values, shared by their rows,
        and empty self-attention slots for n_ctx positions."""
        new = copy.copy(self)
        index = torch.as_tensor(index, device=self.self_kv[0][0].device)
        if len(index) != len(self.self_kv[0][0]) or not torch.equal(index.cpu(), torch.arange(len(index))):
            new.cross = [[None if kv is None else (kv[0][index], kv[1][index]) for kv in layer] for layer in self.cross]
        k = self.self_kv[0][0]
        shape = (len(index) * group, k.shape[1], n_ctx, k.shape[3])
        new.self_kv = [(k.new_empty(shape), k.new_empty(shape)) for _ in self.self_kv]
        new.pad = None
        return new


# -----------------------------------------------------------------------------
# audio front end

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames a second
TOKENS_PER_SECOND = SAMPLE_RATE // (2 * HOP_LENGTH)  # 50 encoder positions (20 ms each) a second


def resample(audio, orig_sr, new_sr=SAMPLE_RATE):
    """Band-limited resampling of float samples (..., n), numpy or torch, with soxr (the SoX
    resampler at its high quality). Returns float32."""
    if orig_sr == new_sr:
        return audio
    import soxr

    is_tensor = torch.is_tensor(audio)
    x = audio.detach().float().cpu().numpy() if is_tensor else np.asarray(audio, dtype=np.float32)
    shape = x.shape
    y = soxr.resample(np.ascontiguousarray(x.reshape(-1, shape[-1]).T), orig_sr, new_sr)  # (n, rows) in, (m, rows) out
    y = np.ascontiguousarray(y.T).reshape(*shape[:-1], -1)
    return torch.from_numpy(y).to(audio.device) if is_tensor else y


def mix_down(data):
    """(n, channels) samples -> (n,): the channels' mean, the same numbers as data.mean(axis=1),
    summed a column at a time, which is several times faster than numpy's reduction over a short
    last axis."""
    if data.shape[1] == 1:
        return data[:, 0]
    x = data[:, 0].copy()
    for c in range(1, data.shape[1]):
        x += data[:, c]
    x /= data.shape[1]
    return x


def decode_with_av(source):
    """(float32 mono samples, sample rate) of a file or file object through PyAV, whose wheels carry
    ffmpeg's libraries: the containers and codecs soundfile does not read (m4a, mp4, webm, ...).
    Raises ImportError when PyAV is not installed, ValueError when it cannot decode the source."""
    import av

    try:
        with av.open(source) as container:
            if not container.streams.audio:
                raise ValueError("it has no audio stream")
            planar = av.AudioResampler(format="fltp")  # float32, the stream's own channels and rate
            chunks, sr = [], container.streams.audio[0].rate
            for frame in container.decode(audio=0):
                chunks += [f.to_ndarray() for f in planar.resample(frame)]  # (channels, n) each
            chunks += [f.to_ndarray() for f in planar.resample(None)]
    except av.FFmpegError as e:
        raise ValueError(e.strerror or type(e).__name__) from None  # without the path, which the caller names
    if not chunks:
        return np.zeros(0, np.float32), sr
    return np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float32), sr


def load_audio(path, sr=SAMPLE_RATE):
    """Read an audio file, mix to mono and resample to `sr`. soundfile reads wav, flac, ogg and
    mp3; other formats (m4a, mp4, webm, ...) go through PyAV when it is installed.
    Returns float32 numpy samples in [-1, 1]."""
    import soundfile as sf

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"audio file {path} is empty (0 bytes)")
    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)  # (n, channels)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError with terse messages
        why = str(e).strip().removeprefix(f"Error opening {path!r}: ") or type(e).__name__
        try:
            audio, file_sr = decode_with_av(path)
        except ImportError:
            raise ValueError(f"cannot decode audio file {path} ({why}): for m4a, mp4, webm and the other formats "
                             "that ffmpeg reads, install PyAV: pip install av") from None
        except ValueError as e2:
            raise ValueError(f"cannot decode audio file {path}: {e2} (soundfile: {why})") from None
    else:
        audio = mix_down(data)
    if not np.isfinite(audio).all():
        raise ValueError(f"audio file {path} contains NaN or infinite samples")
    return np.ascontiguousarray(resample(audio, file_sr, sr), dtype=np.float32)


def pad_or_trim(array, length=N_SAMPLES, axis=-1):
    """Pad with zeros or trim the given axis to `length` (numpy or torch)."""
    n = array.shape[axis]
    if n > length:
        index = [slice(None)] * array.ndim
        index[axis] = slice(0, length)
        return array[tuple(index)]
    if n < length:
        if torch.is_tensor(array):
            pad = [0, 0] * array.ndim
            pad[2 * (array.ndim - 1 - (axis % array.ndim)) + 1] = length - n
            return F.pad(array, pad)
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - n)
        return np.pad(array, widths)
    return array


@lru_cache(maxsize=None)
def _mel_filters_cpu(n_mels, sr=SAMPLE_RATE, n_fft=N_FFT):
    """Slaney-style mel filterbank (the one librosa builds by default and Whisper was trained with):
    triangles spaced on the Slaney mel scale (linear below 1 kHz, logarithmic above), each
    normalised to unit area so that wide high-frequency bands are not louder."""
    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(f >= 1000.0, log, lin)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        lin = m * (200.0 / 3)
        log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
        return np.where(m >= 15.0, log, lin)

    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))  # (n_mels, n_fft // 2 + 1)


def mel_filters(n_mels, device="cpu"):
    return _mel_filters_cpu(n_mels).to(device)


def log_mel_spectrogram(audio, n_mels=80, padding=0, device=None):
    """Whisper's log-mel spectrogram of 16 kHz audio: (n,) -> (n_mels, frames) or batched
    (B, n) -> (B, n_mels, frames). The dynamic range is clipped to 8 (log10 units) below each
    item's maximum, then scaled to roughly [-1, 1]."""
    if isinstance(audio, (str, Path)):
        audio = load_audio(audio)
    if not torch.is_tensor(audio):
        audio = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    if device is not None:
        audio = audio.to(device)
    audio = audio.float()
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT, device=audio.device)
    n_frames, stop = audio.shape[-1] // HOP_LENGTH, audio.shape[-1]  # the STFT's last frame is dropped, as Whisper does
    if audio.device.type == "cpu":
        # frames whose windows lie past every row's last nonzero sample (a short clip's zero
        # padding) are zero: the STFT runs up to the samples that reach nonzero ones, zero columns
        # stand in for the rest (the same numbers; a 2-second clip in a 30-second window: 3.5 ms
        # instead of 7.8, a batch of train.py's demo clips: about 33 ms instead of 105)
        nonzero = audio.reshape(-1, audio.shape[-1]).ne(0).any(dim=0).nonzero()
        stop = min(stop, (int(nonzero[-1]) + 1 if len(nonzero) else 0) + N_FFT // 2 + 1)  # the end's reflection is zeros too
    stft = torch.stft(audio[..., :stop], N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :n_frames].abs() ** 2
    if magnitudes.shape[-1] < n_frames:
        magnitudes = F.pad(magnitudes, (0, n_frames - magnitudes.shape[-1]))
    mel = mel_filters(n_mels, audio.device) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0

# -----------------------------------------------------------------------------
# tokenizer

# Whisper's language tokens, in the order of their ids (large-v3 added "yue" as the 100th).
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian",
    "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer",
    "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
TO_LANGUAGE_CODE = {name: code for code, name in LANGUAGES.items()}

# GPT-2's pre-tokenisation pattern, which Whisper's byte-level BPE uses.
_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters, used to store byte tokens in
    vocab.json."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


class Tokenizer:
    """Whisper's tokenizer on tiktoken, built from a checkpoint's own vocab.json.

    Special tokens follow the BPE vocabulary in Whisper's order: endoftext, startoftranscript,
    the language tokens, translate, transcribe, startoflm, startofprev, nospeech, notimestamps, and
    1501 timestamp tokens <|0.00|> ... <|30.00|>."""

    def __init__(self, vocab_path, num_languages=99, multilingual=True, language=None, task="transcribe"):
        import tiktoken

        vocab_path = Path(vocab_path)
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab_path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"tokenizer vocabulary {vocab_path} is not valid JSON: {e}") from None
        to_bytes = {ord(c): b for b, c in _bytes_to_unicode().items()}  # str.translate, then latin-1: each character one byte
        ranks = {}
        for token, rank in vocab.items():
            if token.startswith("<|") and token.endswith("|>"):
                continue  # special tokens are added below, in Whisper's order
            ranks[token.translate(to_bytes).encode("latin-1")] = rank
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{vocab_path} does not hold a contiguous BPE vocabulary")
        self.num_languages = num_languages
        self.multilingual = multilingual
        self.language_codes = list(LANGUAGES)[:num_languages]
        specials = ["<|endoftext|>", "<|startoftranscript|>"]
        specials += [f"<|{code}|>" for code in self.language_codes]
        specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
        specials += [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
        n = len(ranks)
        self.special_tokens = {s: n + i for i, s in enumerate(specials)}
        self.encoding = tiktoken.Encoding(
            name=vocab_path.parent.name or "whisper", pat_str=_PAT, mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_vocab = self.encoding.n_vocab
        self.language = language if multilingual else "en"
        if self.language is not None and self.language not in self.language_codes:
            self.language = self.to_language_code(self.language)
        self.task = task

    @classmethod
    def from_pretrained(cls, folder, n_vocab=None, **kwargs):
        """Tokenizer of a checkpoint folder (Hugging Face layout). The vocabulary size decides
        English-only (51864) or multilingual (51865; 51866 with large-v3's extra language)."""
        folder = Path(folder)
        if n_vocab is None:
            cfg = folder / "config.json"
            cfg = _read_json(cfg)
            n_vocab = cfg.get("vocab_size") or cfg.get("dims", {}).get("n_vocab") or 51865  # hub layout or ours
        dims = ModelDimensions(n_vocab=n_vocab)
        return cls(folder / "vocab.json", dims.num_languages, dims.is_multilingual, **kwargs)

    def to_language_code(self, language):
        lang = language.lower()
        if lang in self.language_codes:
            return lang
        if TO_LANGUAGE_CODE.get(lang) in self.language_codes:
            return TO_LANGUAGE_CODE[lang]
        raise ValueError(f"unsupported language {language!r}; expected a code such as 'en' or 'az' or a name such as 'azerbaijani'")

    # text
    def encode(self, text):
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, tokens):
        """Text of the tokens, leaving out timestamps (and every other special token)."""
        return self.encoding.decode([t for t in tokens if t < self.eot])

    def decode_with_timestamps(self, tokens):
        """Text of all tokens, timestamps written as <|1.08|>."""
        return self.encoding.decode(list(tokens))

    # special tokens
    def _special(self, s):
        return self.special_tokens[s]

    eot = property(lambda self: self._special("<|endoftext|>"))
    sot = property(lambda self: self._special("<|startoftranscript|>"))
    transcribe_token = property(lambda self: self._special("<|transcribe|>"))
    translate_token = property(lambda self: self._special("<|translate|>"))
    sot_lm = property(lambda self: self._special("<|startoflm|>"))
    sot_prev = property(lambda self: self._special("<|startofprev|>"))
    no_speech = property(lambda self: self._special("<|nospeech|>"))
    no_timestamps = property(lambda self: self._special("<|notimestamps|>"))
    timestamp_begin = property(lambda self: self._special("<|0.00|>"))

    def language_token(self, language=None):
        code = self.to_language_code(language or self.language or "en")
        return self.special_tokens[f"<|{code}|>"]

    @property
    def all_language_tokens(self):
        return [self.special_tokens[f"<|{c}|>"] for c in self.language_codes]

    def sot_sequence(self, language=None, task=None):
        """The prompt that starts a transcript: <|startoftranscript|> alone for English-only
        models; followed by the language and task tokens for multilingual ones."""
        seq = [self.sot]
        if self.multilingual:
            language = language or self.language
            if language is not None:
                seq.append(self.language_token(language))
            task = task or self.task
            if task is not None:
                seq.append(self.transcribe_token if task == "transcribe" else self.translate_token)
        return seq

    @property
    def non_speech_tokens(self):
        """Tokens of symbols that are not speech (brackets, music signs, ...), which decoding
        suppresses so that the model does not narrate sounds; the same list Whisper builds."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return sorted(result)


def get_tokenizer(model_or_folder, **kwargs):
    """Tokenizer for a model returned by `load_model` (from the files beside its weights) or for a
    checkpoint folder."""
    if isinstance(model_or_folder, nn.Module):
        folder = getattr(model_or_folder, "source_dir", None)
        if folder is None:
            raise ValueError("this model was not loaded from a folder with tokenizer files; pass the folder to get_tokenizer")
        return Tokenizer.from_pretrained(folder, n_vocab=model_or_folder.dims.n_vocab, **kwargs)
    return Tokenizer.from_pretrained(model_or_folder, **kwargs)

# -----------------------------------------------------------------------------
# loading and saving

# Official Hugging Face tensor names -> ours (openai-whisper's). {i} is a layer index.
HF_KEY_MAP = {
    "model.encoder.conv1.weight": "encoder.conv1.weight",
    "model.encoder.conv1.bias": "encoder.conv1.bias",
    "model.encoder.conv2.weight": "encoder.conv2.weight",
    "model.encoder.conv2.bias": "encoder.conv2.bias",
    "model.encoder.embed_positions.weight": "encoder.positional_embedding",
    "model.encoder.layer_norm.weight": "encoder.ln_post.weight",
    "model.encoder.layer_norm.bias": "encoder.ln_post.bias",
    "model.decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "model.decoder.embed_positions.weight": "decoder.positional_embedding",
    "model.decoder.layer_norm.weight": "decoder.ln.weight",
    "model.decoder.layer_norm.bias": "decoder.ln.bias",
}
HF_LAYER_KEY_MAP = {  # per layer, for "encoder" and "decoder" alike (encoder_attn only in the decoder)
    "self_attn.q_proj.weight": "attn.query.weight",
    "self_attn.q_proj.bias": "attn.query.bias",
    "self_attn.k_proj.weight": "attn.key.weight",
    "self_attn.v_proj.weight": "attn.value.weight",
    "self_attn.v_proj.bias": "attn.value.bias",
    "self_attn.out_proj.weight": "attn.out.weight",
    "self_attn.out_proj.bias": "attn.out.bias",
    "self_attn_layer_norm.weight": "attn_ln.weight",
    "self_attn_layer_norm.bias": "attn_ln.bias",
    "encoder_attn.q_proj.weight": "cross_attn.query.weight",
    "encoder_attn.q_proj.bias": "cross_attn.query.bias",
    "encoder_attn.k_proj.weight": "cross_attn.key.weight",
    "encoder_attn.v_proj.weight": "cross_attn.value.weight",
    "encoder_attn.v_proj.bias": "cross_attn.value.bias",
    "encoder_attn.out_proj.weight": "cross_attn.out.weight",
    "encoder_attn.out_proj.bias": "cross_attn.out.bias",
    "encoder_attn_layer_norm.weight": "cross_attn_ln.weight",
    "encoder_attn_layer_norm.bias": "cross_attn_ln.bias",
    "fc1.weight": "mlp.0.weight",
    "fc1.bias": "mlp.0.bias",
    "fc2.weight": "mlp.2.weight",
    "fc2.bias": "mlp.2.bias",
    "final_layer_norm.weight": "mlp_ln.weight",
    "final_layer_norm.bias": "mlp_ln.bias",
}
HF_TIED_OUTPUT = "proj_out.weight"  # tied to the token embedding; files usually leave it out

# Files a checkpoint folder needs besides its weights; fetched from the hub with them.
HUB_FILES = ["config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json",
             "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json", "normalizer.json",
             "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
OFFICIAL_NAMES = ["tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium",
                  "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo"]


def hf_key_map(dims):
    """The full official -> ours table for a model of these dimensions."""
    table = dict(HF_KEY_MAP)
    for side, n_layer in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n_layer):
            for theirs, ours in HF_LAYER_KEY_MAP.items():
                if side == "encoder" and theirs.startswith("encoder_attn"):
                    continue
                table[f"model.{side}.layers.{i}.{theirs}"] = f"{side}.blocks.{i}.{ours}"
    return table


def _read_safetensors(folder):
    """All tensors of a folder's model.safetensors, or of its shards listed in
    model.safetensors.index.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"weights file missing: {path}")
        try:
            part = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); download it again") from None
        dup = state.keys() & part.keys()
        if dup:
            raise ValueError(f"{path} repeats tensors of another shard, e.g. {sorted(dup)[0]}")
        state.update(part)
    return state


def remap(state, table, source):
    """Rename official tensors to ours through `table`, checking that every tensor is known and
    used exactly once."""
    unknown = [k for k in state if k not in table and k != HF_TIED_OUTPUT]
    if unknown:
        raise ValueError(f"{source} is not a Whisper checkpoint of the size its config gives: unexpected tensor {unknown[0]!r}"
                         f" ({len(unknown)} unexpected in all)")
    missing = [k for k in table if k not in state]
    if missing:
        raise ValueError(f"{source} is not a complete Whisper checkpoint: tensor {missing[0]!r} is missing ({len(missing)} in all)")
    assert len(set(table.values())) == len(table), "the key table maps two official tensors to one of ours"
    out = {table[k]: v for k, v in state.items() if k != HF_TIED_OUTPUT}
    if HF_TIED_OUTPUT in state and not torch.equal(state[HF_TIED_OUTPUT], state["model.decoder.embed_tokens.weight"]):
        raise ValueError(f"{source} has an output projection that is not tied to the token embedding; Whisper ties them")
    return out


def resolve(name_or_path, allow_patterns=HUB_FILES, what="model folder or file", needs="model.safetensors and config.json"):
    """A local folder for a model name, hub id or path; downloads only `allow_patterns`, the files a
    model needs. `what` was looked for and a local folder `needs` those files, for the errors."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir() and not (path / "config.json").exists():  # a train.py run folder: its best checkpoint, else its latest
        for sub in ("best", "latest"):
            if (path / sub / "config.json").exists():
                return path / sub
    if path.exists():
        return path
    name = str(name_or_path)
    if name in OFFICIAL_NAMES:
        name = "openai/whisper-" + {"large": "large-v3", "turbo": "large-v3-turbo"}.get(name, name)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(".pt")
    if not looks_like_hub_id:
        raise FileNotFoundError(f"{what} not found: {name_or_path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns, local_files_only=True))
    except Exception:
        pass  # not in the local cache
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(
            f"cannot download {name} from the Hugging Face Hub ({reason[:160]}); give a local folder with "
            f"{needs} instead, e.g. ../shared/models/whisper-tiny.en") from None


def load_model(name_or_path="tiny.en", device="cpu", dtype=torch.float32, dual=True, gate=None, branch2=None):
    """Load Whisper weights into our model.

    `name_or_path`: an official name ("tiny.en", "small", "large-v3", "turbo"), a Hugging Face hub
    id ("openai/whisper-small"), a local folder in the hub's layout (model.safetensors or shards,
    config.json, generation and tokenizer files), OpenAI's original .pt checkpoint, or a folder
    saved by `save_model` (a fine-tuned dual model). Official weights leave the new dual-attention
    parameters freshly initialised (so the model computes exactly what Whisper computes);
    dual=False builds plain single-attention Whisper. gate and branch2 choose the fusion and the
    second branch's start for official weights (ModelDimensions); a saved model keeps its own."""
    variant = {k: v for k, v in (("gate", gate), ("branch2", branch2)) if v is not None}
    path = resolve(name_or_path)
    if path.is_file() and path.suffix == ".pt":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:160]})") from None
        if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
            raise ValueError(f"{path} is not an OpenAI Whisper checkpoint (expected 'dims' and 'model_state_dict')")
        dims = ModelDimensions(**ckpt["dims"], dual=dual, **variant)
        state = dict(ckpt["model_state_dict"])
        state.setdefault("encoder.positional_embedding", sinusoids(dims.n_audio_ctx, dims.n_audio_state))
        source_dir = path.parent
    elif path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise ValueError(f"{path} holds no config.json: not a Whisper checkpoint folder")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
        state = _read_safetensors(path)
        if cfg.get("model_type") == "dualwhisper":  # one of ours: our names already
            dims = ModelDimensions.from_dict(cfg["dims"])
            odd = {k: v for k, v in variant.items() if dims.dual and dual and getattr(dims, k) != v}
            if odd:
                raise ValueError(f"{path} is a saved model with gate={dims.gate!r}, branch2={dims.branch2!r}; it cannot load as {odd}")
            if not dual and dims.dual:
                state = {k: v for k, v in state.items() if not is_dual_parameter(k)}
            dims.dual = dims.dual and dual
            expected = set(empty_model(dims).state_dict())
            if set(state) != expected:
                odd = sorted(set(state) ^ expected)
                raise ValueError(f"{path} does not match its config: tensor {odd[0]!r} is missing or unexpected")
        elif cfg.get("model_type") == "whisper":
            dims = ModelDimensions.from_hf_config(cfg, dual=dual, **variant)
            state = remap(state, hf_key_map(dims), path)
        else:
            raise ValueError(f"{cfg_path} describes a {cfg.get('model_type')!r} model, not Whisper")
        source_dir = path
    else:
        raise ValueError(f"{path} is neither a checkpoint folder nor a .pt file")

    model = empty_model(dims)
    expected = model.state_dict()
    for k, v in state.items():
        if expected[k].shape != v.shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)} from the config")
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys
    left = [k for k in result.missing_keys if not is_dual_parameter(k)]
    assert not left, f"not loaded: {left}"
    for block in model.decoder.blocks:  # the new parts, not in the file, are still on the meta device
        if block.dual and block.cross_attn2.query.weight.is_meta:
            for sub in block.modules():
                for name, p in list(sub.named_parameters(recurse=False)):
                    if p.is_meta:
                        setattr(sub, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype)))
            block.reset_dual_parameters()
            if dims.branch2 == "copy":
                block.copy_primary_branch()
    model = model.to(device=device, dtype=dtype)
    model.source_dir = source_dir
    model.generation_config = _read_json(source_dir / "generation_config.json")
    return model.eval()


def empty_model(dims):
    with torch.device("meta"):
        return Whisper(dims)


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "added_tokens.json",
                   "special_tokens_map.json", "normalizer.json", "generation_config.json", "preprocessor_config.json"]


def plain_mode(folder=False):
    """The mode that open() gives a new file (mkdir a new folder) under this process's umask, for
    files made under temporary names, which tempfile creates private (0600, 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def save_model(model, folder, extra=None):
    """Save our model as model.safetensors plus config.json (dimensions and `extra`, e.g. the
    training config), with the tokenizer and generation files of the model it came from, so that
    the folder loads with `load_model` on its own. Written to a temporary folder, then renamed."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DDP wrapper
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        tmp.chmod(plain_mode(folder=True))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "model.safetensors").chmod(plain_mode())  # safetensors creates it 0600
        cfg = {"model_type": "dualwhisper", "dims": asdict(model.dims), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if model.source_dir is not None and Path(model.source_dir).resolve() != folder.resolve():
            for name in TOKENIZER_FILES:
                src = Path(model.source_dir) / name
                if src.exists():
                    shutil.copyfile(src, tmp / name)
        elif folder.exists():
            for name in TOKENIZER_FILES:
                if (folder / name).exists():
                    shutil.copyfile(folder / name, tmp / name)
        old = None
        if folder.exists():
            old = folder.parent / (folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.source_dir = folder
    return folder


# -----------------------------------------------------------------------------
# noise: the same mixing for training augmentation and for evaluation at fixed SNRs

NOISE_KINDS = ("bank", "white", "pink", "brown", "babble", "talker")


def power(x, dim=-1, lengths=None):
    """Mean power of signals (..., n), over the first `lengths` samples of each row when given
    (lengths: (...,)); floored so that silence does not divide by zero."""
    x = x.float()
    if lengths is None:
        return x.pow(2).mean(dim=dim).clamp_min(1e-10)
    # each row over its own samples: the same number however long the row's padding (batches cut
    # at their longest clip)
    rows, lengths = x.reshape(-1, x.shape[-1]), torch.as_tensor(lengths).reshape(-1).tolist()
    return torch.stack([r[:L].pow(2).sum() / max(L, 1) for r, L in zip(rows, lengths)]).view(x.shape[:-1]).clamp_min(1e-10)


def mix_at_snr(clean, noise, snr_db, lengths=None, speech=None):
    """clean + noise scaled so that the clean-to-noise power ratio is `snr_db` decibels.
    clean, noise: (B, n) on any device; snr_db: a number or (B,), +inf for no noise. Without
    `lengths` powers are measured over the whole signal (give equal-length signals); with lengths
    (B,) over each row's first lengths[b] samples, and the noise stops there, so that the zero
    padding after a clip stays silent. speech: (B, n) bool, the samples both powers are measured
    over instead (a packed window's clips, not the silence between them)."""
    snr_db = torch.as_tensor(snr_db, dtype=torch.float32, device=clean.device)
    if lengths is not None:
        noise = noise * (torch.arange(noise.shape[-1], device=clean.device) < torch.as_tensor(lengths, device=clean.device)[..., None])
    if speech is None:
        p_clean, p_noise = power(clean, lengths=lengths), power(noise, lengths=lengths)
    else:
        m = speech.to(clean.device, torch.float32)
        n = m.sum(-1).clamp_min(1)
        p_clean, p_noise = ((clean.float() ** 2 * m).sum(-1) / n).clamp_min(1e-10), ((noise.float() ** 2 * m).sum(-1) / n).clamp_min(1e-10)
    scale = torch.sqrt(p_clean / (p_noise * 10 ** (snr_db / 10)))  # (B,)
    return clean + scale[..., None].to(clean.dtype) * noise


def coloured_noise(shape, colour="white", generator=None, device="cpu"):
    """Gaussian noise with power spectral density ~ 1/f^k: white (k=0), pink (k=1), brown (k=2);
    unit power. shape: (..., n). Pink and brown are shaped over the next power of two of n samples
    and cut to n: an FFT of any length costs a new plan per length (on an H200, 20 ms against 0.4
    for a clip of a few seconds), and clips come in every length."""
    exponent = {"white": 0.0, "pink": 1.0, "brown": 2.0}[colour]
    n = shape[-1]
    if not exponent:
        x = torch.randn(shape, generator=generator, device=device)
    else:
        m = 1 << max(n - 1, 1).bit_length()
        spec = torch.fft.rfft(torch.randn((*shape[:-1], m), generator=generator, device=device))
        f = torch.fft.rfftfreq(m, device=device)
        f[0] = f[1]  # no infinite gain at DC
        x = torch.fft.irfft(spec / f.pow(exponent / 2), n=m)[..., :n]
    return x / power(x).sqrt()[..., None]


def babble(utterances, n_talkers=4, generator=None):
    """Babble noise for each row of `utterances` (B, n): the sum of `n_talkers` other rows picked at
    random (rolled in time so that they do not start together), each at unit power. Needs B >= 2."""
    B, n = utterances.shape
    assert B >= 2, "babble needs at least two utterances in the batch"
    dev = utterances.device
    out = torch.zeros_like(utterances, dtype=torch.float32)
    rows = torch.arange(B, device=dev)
    for _ in range(n_talkers):
        other = (rows + torch.randint(1, B, (B,), generator=generator, device=generator.device if generator else "cpu").to(dev)) % B
        shift = int(torch.randint(0, n, (1,), generator=generator, device=generator.device if generator else "cpu"))
        talker = utterances[other].float().roll(shift, dims=-1)
        out += talker / power(talker).sqrt()[..., None]
    return out


def _rng(seed, stream, key):
    """A numpy generator for one clip: `key` (an int or a tuple of ints) names the clip, `stream`
    the use (1: noise, 2: SpecAugment), so that draws never depend on batch, rank or device."""
    return np.random.default_rng([int(seed), stream, *(int(k) for k in np.atleast_1d(key))])


def _clip(source, i, start=0, end=None):
    """Samples start:end of clip i of a noise or speech source as float32: a prepare.PreparedSplit
    (int16, only those samples converted) or a list of float arrays."""
    if hasattr(source, "audio"):
        return np.asarray(source.audio(i)[start:end], dtype=np.float32) / 32768.0
    return np.asarray(source[i][start:end], dtype=np.float32)


def _clip_len(source, i):
    return int(source.lengths[i]) if hasattr(source, "lengths") else len(source[i])


def _looped(source, i, n, offset):
    """n samples of clip i of `source` played in a loop from `offset`, copied a stretch at a time."""
    out, length = np.zeros(n, dtype=np.float32), _clip_len(source, i)
    done, start = 0, offset % max(length, 1)
    while length and done < n:
        k = min(n - done, length - start)
        out[done:done + k] = _clip(source, i, start, start + k)
        done, start = done + k, 0
    return out


class NoiseMixer:
    """Noise added to batches of speech on their own device, drawn per clip from (seed, key): the
    same key always gets the same noise whatever the batch, rank or device, so that a run resumes
    exactly, any number of ranks trains on the same data, and evaluation conditions repeat.

    kinds: {kind: probability}; what is left of 1 stays clean. The kinds:
      bank              a stretch of a recording of `bank` (prepare.py's noise split), from a
                        random start, looped to the clip's length
      white/pink/brown  Gaussian noise with a 1/f^0, 1/f, 1/f^2 power spectrum
      babble            babble_talkers (low, high) utterances of `pool`, each looped from a random
                        start at unit power, summed
      talker            one other utterance of `pool` overlapping the clip, starting in its first half
                        (in a packed window: one for each of its clips)
    Every kind is mixed at an SNR drawn uniformly from snr_db (low, high), except "talker", whose
    level below the speech is drawn from talker_db (low, high). The SNR is measured over the clip,
    and the noise stops where the clip ends; in a packed window (`spans`: where its clips lie) the
    noise fills the window and the SNR is measured over the clips. bank, pool: prepare.PreparedSplit
    or lists of float arrays at 16 kHz."""

    def __init__(self, kinds, bank=None, pool=None, snr_db=(0.0, 20.0), talker_db=(5.0, 15.0), babble_talkers=(3, 6), seed=0):
        unknown = sorted(set(kinds) - set(NOISE_KINDS))
        if unknown:
            raise ValueError(f"unknown noise kind {unknown[0]!r}; the kinds are {', '.join(NOISE_KINDS)}")
        self.kinds = [k for k in NOISE_KINDS if kinds.get(k, 0) > 0]
        self.p = np.array([float(kinds[k]) for k in self.kinds])
        if any(not 0 <= float(p) <= 1 for p in kinds.values()) or self.p.sum() > 1 + 1e-6:
            raise ValueError(f"noise probabilities must lie in [0, 1] and sum to at most 1, not {dict(kinds)}")
        if "bank" in self.kinds and (bank is None or len(bank) == 0):
            raise ValueError("noise kind 'bank' needs a noise bank: prepare one with `prepare.py --noise_dir` (split 'noise')")
        if ({"babble", "talker"} & set(self.kinds)) and (pool is None or len(pool) < 2):
            raise ValueError("noise kinds 'babble' and 'talker' need a pool of at least two other utterances")
        for name, (lo, hi) in (("snr_db", snr_db), ("talker_db", talker_db), ("babble_talkers", babble_talkers)):
            if lo > hi:
                raise ValueError(f"{name} must be a range (low, high) with low <= high, not {(lo, hi)}")
        if babble_talkers[0] < 1:
            raise ValueError(f"babble needs at least one talker, not {babble_talkers}")
        self.bank, self.pool, self.seed = bank, pool, seed
        self.snr_db, self.talker_db, self.babble_talkers = tuple(snr_db), tuple(talker_db), tuple(babble_talkers)

    @classmethod
    def fixed(cls, kind, snr_db, bank=None, pool=None, babble_talkers=4, seed=0):
        """Every clip with `kind` at exactly `snr_db` (for "talker": that many dB below the speech):
        an evaluation condition, e.g. NoiseMixer.fixed("babble", 5, pool=val_split)."""
        return cls({kind: 1.0}, bank, pool, (snr_db, snr_db), (snr_db, snr_db), (babble_talkers, babble_talkers), seed)

    def _others(self, rng, k, exclude):
        """k indices of `pool`, never `exclude` (the clip itself, or the clips of a packed window,
        as far as the pool allows), distinct while the pool allows."""
        exclude = sorted(set(np.atleast_1d(exclude).tolist())) if exclude is not None else []
        if len(self.pool) - len(exclude) < 1:
            exclude = exclude[:1]
        picks = rng.choice(len(self.pool) - len(exclude), size=k, replace=k > len(self.pool) - len(exclude))
        out = []
        for j in picks.tolist():
            for e in exclude:  # the j-th index that is not excluded
                j += j >= e
            out.append(int(j))
        return out

    def draw(self, key, length, exclude=None, spans=None):
        """The recipe for one clip of `length` samples (or a packed window, its clips at `spans`,
        [(start, end)]): {"kind": None (clean) or a kind, "snr_db", "seed" (coloured noise),
        "pieces": [(index, offset)] or [(index, start)] for talker}."""
        rng = _rng(self.seed, 1, key)
        i = int(np.searchsorted(np.cumsum(self.p), rng.random(), side="right"))
        if i >= len(self.kinds):
            return {"kind": None}
        kind = self.kinds[i]
        lo, hi = self.talker_db if kind == "talker" else self.snr_db
        recipe = {"kind": kind, "snr_db": float(rng.uniform(lo, hi)), "pieces": []}
        if kind in ("white", "pink", "brown"):
            recipe["seed"] = int(rng.integers(2**62))
        elif kind == "bank":
            j = int(rng.integers(len(self.bank)))
            recipe["pieces"] = [(j, int(rng.integers(max(1, _clip_len(self.bank, j)))))]
        elif kind == "babble":
            n = int(rng.integers(self.babble_talkers[0], self.babble_talkers[1] + 1))
            recipe["pieces"] = [(j, int(rng.integers(max(1, _clip_len(self.pool, j))))) for j in self._others(rng, n, exclude)]
        else:  # talker
            spans = [(0, length)] if spans is None else spans
            others = self._others(rng, len(spans), exclude)
            recipe["pieces"] = [(j, a + int(rng.integers(max(1, (b - a) // 2)))) for j, (a, b) in zip(others, spans)]
        return recipe

    def noise(self, recipes, lengths, n, device="cpu"):
        """The unscaled noise (B, n) of a batch of recipes, zero beyond each clip's length:
        coloured noise generated on `device`, recordings and talkers gathered from their sources."""
        out = torch.zeros(len(recipes), n, device=device)
        rows = [b for b, (r, L) in enumerate(zip(recipes, lengths)) if r["kind"] in ("bank", "babble", "talker") and L > 0]
        gathered = np.zeros((len(rows), n), dtype=np.float32)  # the recorded noise, filled on the host
        for b, (r, L) in enumerate(zip(recipes, lengths)):
            if r["kind"] in ("white", "pink", "brown") and L > 0:
                gen = torch.Generator(device=device).manual_seed(r["seed"])
                out[b, :L] = coloured_noise((L,), r["kind"], generator=gen, device=device)
        for g, b in zip(gathered, rows):
            r, L = recipes[b], lengths[b]
            if r["kind"] == "bank":
                (j, offset), = r["pieces"]
                g[:L] = _looped(self.bank, j, L, offset)
            elif r["kind"] == "babble":
                for j, offset in r["pieces"]:
                    x = _looped(self.pool, j, L, offset)
                    g[:L] += x / np.sqrt(max(float(np.mean(x.astype(np.float64) ** 2)), 1e-10))
            else:  # talker
                for j, start in r["pieces"]:
                    x = _clip(self.pool, j, 0, max(0, L - start))
                    g[start:start + len(x)] += x
        if rows:
            out[rows] = torch.from_numpy(gathered).to(device, non_blocking=True)
        return out

    def __call__(self, audio, lengths, keys, exclude=None, spans=None):
        """audio: (B, n) float speech, zero after lengths[b]; keys: one int (or tuple of ints) per
        clip; exclude: per clip its own index in `pool` (never mixed with itself; a list for a
        packed window), or None; spans: per row the (start, end) samples of its clips, for packed
        windows, where noise fills lengths[b] and the SNR is measured over the clips.
        Returns the noisy batch on audio's device."""
        B, n = audio.shape
        lengths = [min(int(L), n) for L in lengths]
        recipes = [self.draw(k, L, None if exclude is None else exclude[b], None if spans is None else spans[b])
                   for b, (k, L) in enumerate(zip(keys, lengths))]
        m = max(lengths, default=0)  # samples up to the longest clip's end: no noise goes past it
        noise = self.noise(recipes, lengths, m, audio.device)
        snr = torch.tensor([r["snr_db"] if r["kind"] else float("inf") for r in recipes], device=audio.device)
        speech = None
        if spans is not None:
            speech = torch.zeros(B, m, dtype=torch.bool)
            for b, row in enumerate(spans):
                for a, e in row:
                    speech[b, a:e] = True
        return torch.cat([mix_at_snr(audio[:, :m], noise, snr, lengths, speech), audio[:, m:]], dim=-1)


def spec_augment(mel, frames, keys, seed=0, freq_masks=2, freq_width=27, time_masks=2, time_width=0.05):
    """SpecAugment (Park et al., 2019) without time warping: per clip, `freq_masks` bands of up to
    `freq_width` mel bins and `time_masks` spans of up to `time_width` of its `frames` (the frames
    that hold speech, the only ones masked: the padding after them stays as decoding sees it), set
    to the clip's mean; drawn from (seed, key) like the noise.
    mel: (B, n_mels, T) on any device."""
    B, M, T = mel.shape
    mask = np.zeros((B, M, T), dtype=bool)
    for b, key in enumerate(keys):
        rng, L = _rng(seed, 2, key), min(int(frames[b]), T)
        for _ in range(freq_masks):
            w = int(rng.integers(0, min(freq_width, M) + 1))
            f0 = int(rng.integers(0, M - w + 1))
            mask[b, f0:f0 + w, :L] = True
        for _ in range(time_masks):
            w = int(rng.integers(0, int(time_width * L) + 1))
            t0 = int(rng.integers(0, max(1, L - w + 1)))
            mask[b, :, t0:t0 + w] = True
    mask = torch.from_numpy(mask).to(mel.device, non_blocking=True)
    return torch.where(mask, mel.mean(dim=(1, 2), keepdim=True), mel)


# -----------------------------------------------------------------------------
# decoding: openai-whisper's decoding and transcription rules on the explicit KV cache, with
# windows of many files decoded together


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode a 30-second window: openai-whisper's options, names and defaults."""

    task: str = "transcribe"  # or "translate" (any language to English)
    language: str = None  # None: detect it on multilingual models
    temperature: float = 0.0  # 0: greedy or beam search; > 0: sampling
    sample_len: int = None  # most tokens to sample; n_text_ctx // 2 by default
    best_of: int = None  # independent samples at temperature > 0, the most likely one kept
    beam_size: int = None  # beams at temperature 0
    patience: float = None  # beam search ends once beam_size * patience sequences have finished
    length_penalty: float = None  # rank by logprob / length (None) or / ((5 + length) / 6) ** alpha
    prompt: object = None  # previous text, as a string or tokens, given after <|startofprev|>
    prefix: object = None  # forced start of this window's text, as a string or tokens
    suppress_tokens: object = "-1"  # ids (or "1,2,3") never to emit; -1 is the checkpoint's non-speech list
    suppress_blank: bool = True  # no blank and no end of text as the first token
    without_timestamps: bool = False  # text tokens only, after <|notimestamps|>
    max_initial_timestamp: float = 1.0  # seconds; the latest first timestamp

    def __post_init__(self):
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', not {self.task!r}")
        if self.beam_size is not None and self.best_of is not None:
            raise ValueError("beam_size and best_of cannot be given together")
        if self.temperature < 0 or (self.temperature == 0 and self.best_of is not None):
            raise ValueError("best_of needs a temperature above 0, and temperatures cannot be negative")
        if self.patience is not None and (self.beam_size is None or self.patience <= 0):
            raise ValueError("patience needs beam_size and must be above 0")
        if any(n is not None and n < 1 for n in (self.beam_size, self.best_of, self.sample_len)):
            raise ValueError("beam_size, best_of and sample_len must be at least 1")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise ValueError("length_penalty (alpha) must lie between 0 and 1")


@dataclass
class DecodingResult:
    tokens: list  # sampled tokens, timestamps included, end of text left out
    text: str
    language: str
    avg_logprob: float  # sum of the tokens' logprobs (end of text included) / (len(tokens) + 1)
    no_speech_prob: float  # probability of <|nospeech|> after <|startoftranscript|>
    temperature: float
    compression_ratio: float
    gates: list = None  # dual models: per token, the gate value (mean over layers) that chose it
    language_probs: dict = None


def model_tokenizer(model):
    """The tokenizer of a model from `load_model`, built once per checkpoint folder (building one
    takes longer than decoding a short file). Decoding passes language and task explicitly."""
    if getattr(model, "source_dir", None) is None:
        return get_tokenizer(model)  # says what is missing
    return _folder_tokenizer(str(model.source_dir), model.dims.n_vocab)


@lru_cache(maxsize=4)
def _folder_tokenizer(folder, n_vocab):
    return Tokenizer.from_pretrained(folder, n_vocab=n_vocab)


def compression_ratio(text):
    """How well gzip compresses the text: repetition loops compress far better than speech."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def suppress_token_list(model, tokenizer, suppress_tokens="-1"):
    """Tokens never to emit: the ids given, where -1 stands for the checkpoint's generation-config
    list (Whisper's non-speech symbols) or, without one, the same list built from the tokenizer;
    plus the special tokens that only prompts use. An empty value suppresses nothing."""
    if isinstance(suppress_tokens, str):
        suppress_tokens = [int(t) for t in suppress_tokens.split(",") if t.strip()]
    if not suppress_tokens:
        return []
    tokens = set(t for t in suppress_tokens if t >= 0)
    if -1 in suppress_tokens:
        tokens |= set(t for t in model.generation_config.get("suppress_tokens") or tokenizer.non_speech_tokens if 0 <= t < tokenizer.eot)
    tokens |= {tokenizer.transcribe_token, tokenizer.translate_token, tokenizer.sot, tokenizer.sot_prev, tokenizer.sot_lm}
    if tokenizer.no_speech is not None:
        tokens.add(tokenizer.no_speech)
    return sorted(tokens)


def encode_audio(model, mel):
    """Encoder features (B, n_audio_ctx, C) of mel windows (B, n_mels, 3000); features pass as they are."""
    param = next(model.parameters())
    if mel.shape[-2:] == (model.dims.n_audio_ctx, model.dims.n_audio_state):
        return mel.to(param.device, param.dtype)
    return model.encoder(mel.to(param.device, param.dtype))


@torch.no_grad()
def detect_language(model, mel_or_cache, tokenizer=None):
    """The spoken language of each window, from the logits that follow <|startoftranscript|>:
    mel windows (B, n_mels, 3000), encoder features or a KVCache of them. Returns the codes and,
    per window, a dict of probabilities over the languages."""
    tokenizer = tokenizer or model_tokenizer(model)
    if not tokenizer.multilingual:
        raise ValueError("this model is English-only: it has no language tokens to detect a language with")
    base = mel_or_cache if isinstance(mel_or_cache, KVCache) else KVCache(model, encode_audio(model, mel_or_cache), 1)
    B = base.self_kv[0][0].shape[0]
    cache = base.rows(list(range(B)), 1)
    dev = cache.self_kv[0][0].device
    logits = model.decoder.project(model.decoder.hidden(torch.full((B, 1), tokenizer.sot, device=dev), kv_cache=cache)[:, -1])
    language_tokens = torch.tensor(tokenizer.all_language_tokens, device=dev)
    probs = logits[:, language_tokens].softmax(dim=-1).cpu()  # (B, n_languages)
    codes = [tokenizer.language_codes[i] for i in probs.argmax(dim=-1).tolist()]
    return codes, [dict(zip(tokenizer.language_codes, p)) for p in probs.tolist()]


def _prompt_tokens(tokenizer, value):
    if isinstance(value, str):
        return tokenizer.encode(" " + value.strip())
    return list(value or [])


def _timestamp_rules(logits, sampled, tokenizer, max_initial):
    """openai-whisper's timestamp rules, for all rows at once, in place. sampled: (N, n) tokens so far.
    Timestamps come in pairs (start, end) except right before the end of text, never decrease,
    the first token is a timestamp no later than `max_initial`, and when the timestamps together
    are more likely than any single text token, a timestamp it is."""
    tb, eot = tokenizer.timestamp_begin, tokenizer.eot
    n = sampled.shape[1]
    if n == 0:
        logits[:, :tb] = -math.inf
        if max_initial is not None:
            logits[:, tb + max_initial + 1:] = -math.inf
    else:
        is_ts = sampled >= tb
        last = is_ts[:, -1]
        penultimate = is_ts[:, -2] if n > 1 else torch.ones_like(last)
        logits[:, tb:].masked_fill_((last & penultimate)[:, None], -math.inf)  # a pair is done: text next
        logits[:, :eot].masked_fill_((last & ~penultimate)[:, None], -math.inf)  # a pair is open: close it
        where = torch.where(is_ts, torch.arange(n, device=sampled.device), -1).amax(dim=1)  # last timestamp
        last_ts = torch.where(where >= 0, sampled.gather(1, where.clamp_min(0)[:, None])[:, 0], tb - 1)
        lowest = torch.where(last & ~penultimate, last_ts, last_ts + 1)  # the end may equal the start only
        ts = torch.arange(tb, logits.shape[1], device=logits.device)
        logits[:, tb:].masked_fill_(ts[None] < lowest[:, None], -math.inf)
    logprobs = F.log_softmax(logits, dim=-1)
    prefer_ts = logprobs[:, tb:].logsumexp(dim=-1) > logprobs[:, :tb].max(dim=-1).values
    logits[:, :tb].masked_fill_(prefer_ts[:, None], -math.inf)


@torch.inference_mode()
def decode_windows(model, tokenizer, base, rows, options, languages, prompts=None, initial=None, gates=False):
    """Decode windows `rows` of `base`, a KVCache that holds the cross-attention keys and values of a
    batch of windows, so that temperature fallback decodes again without the encoder. Each row has
    its language and its prompt (previous-text tokens); rows with prompts of different lengths are
    left-padded. gates: add each token's gate value (dual models). Returns one DecodingResult per row.
    With model.decoding_step set (use_static_decoding), the steps after the prompt run there.
    In inference mode, which spares each of a step's few hundred small torch calls some
    bookkeeping; no tensor made here leaves it."""
    o = options
    B = len(rows)
    n_ctx = model.dims.n_text_ctx
    sample_len = o.sample_len or n_ctx // 2
    G = o.beam_size or o.best_of or 1  # rows per window: beams or samples
    eot = tokenizer.eot
    dev = base.self_kv[0][0].device

    # the initial tokens of each window: [<|startofprev|> prompt] <|startoftranscript|> [language task] [<|notimestamps|>] [prefix]
    if initial is None:
        initial = []
        for i in range(B):
            seq = tokenizer.sot_sequence(languages[i], o.task) + ([tokenizer.no_timestamps] if o.without_timestamps else [])
            if o.prefix:
                prefix = _prompt_tokens(tokenizer, o.prefix)
                room = n_ctx // 2 - sample_len
                seq += prefix[-room:] if room > 0 else prefix
            prompt = prompts[i] if prompts is not None else _prompt_tokens(tokenizer, o.prompt)
            if prompt:
                seq = [tokenizer.sot_prev] + list(prompt)[-(n_ctx // 2 - 1):] + seq
            initial.append(seq)
    L = max(map(len, initial))
    pad = [L - len(seq) for seq in initial]
    sot_index = torch.tensor([p + seq.index(tokenizer.sot) for p, seq in zip(pad, initial)], device=dev)
    tokens = torch.tensor([[eot] * p + seq for p, seq in zip(pad, initial)], device=dev).repeat_interleave(G, dim=0)
    N = B * G
    cache = base.rows(rows, L + sample_len, group=G)
    if any(pad):
        cache.pad = torch.tensor(pad, device=dev).repeat_interleave(G)
    too_long = n_ctx - L + torch.tensor(pad, device=dev).repeat_interleave(G)  # a row may sample this many tokens

    # the logit rules
    bias = torch.zeros(model.dims.n_vocab, device=dev)
    bias[suppress_token_list(model, tokenizer, o.suppress_tokens)] = -math.inf
    if not o.without_timestamps:
        bias[tokenizer.no_timestamps] = -math.inf
    blank = tokenizer.encode(" ") + [eot]
    max_initial = None
    if o.max_initial_timestamp:
        max_initial = round(o.max_initial_timestamp / (CHUNK_LENGTH / model.dims.n_audio_ctx))

    sum_logprobs = torch.zeros(N, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    alive, final = list(range(N)), [None] * N  # sampling: rows still in the batch; (tokens, sum of logprobs) of those that left
    finished = [{} for _ in range(B)]  # beam search: finished sequence -> sum of logprobs
    max_candidates = round(G * (o.patience or 1.0))
    beam = o.beam_size is not None
    static = getattr(model, "decoding_step", None)  # use_static_decoding: fixed-shape steps after the prompt
    x, offset = tokens, 0
    for step in range(sample_len):
        if static is not None and step > 0:
            h = static(x, offset)
        else:
            h = model.decoder.hidden(x, kv_cache=cache, offset=offset)
            if static is not None:
                static.start(cache, offset + x.shape[1])
        offset += x.shape[1]
        if step == 0:  # the no-speech probability: at <|startoftranscript|>, projected with the last position
            logits = model.decoder.project(torch.cat([h[:, -1], h[torch.arange(N, device=dev), sot_index.repeat_interleave(G)]]))
            no_speech_probs = logits[N:].softmax(dim=-1)[:, tokenizer.no_speech].tolist()[::G]
            logits = logits[:N]
        else:
            logits = model.decoder.project(h[:, -1])  # (N, V)
        logits += bias
        if step == 0 and o.suppress_blank:
            logits[:, blank] = -math.inf
        if not o.without_timestamps:
            _timestamp_rules(logits, tokens[:, L:], tokenizer, max_initial)

        if not beam:
            if o.temperature == 0:
                next_tokens = logits.argmax(dim=-1)
            else:
                next_tokens = torch.multinomial((logits / o.temperature).softmax(dim=-1), 1)[:, 0]
            logprobs = F.log_softmax(logits, dim=-1)
            sum_logprobs += logprobs.gather(1, next_tokens[:, None])[:, 0] * ~done
            next_tokens = torch.where(done, eot, next_tokens)
            done |= (next_tokens == eot) | (step + 1 > too_long)  # openai-whisper stops past n_text_ctx tokens
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            x = next_tokens[:, None]
            n_done = int(done.sum())
            if n_done == len(done):
                break
            if G == 1 and 4 * n_done >= len(done) and static is None:  # a quarter of the rows are done: they leave the batch
                for i in done.nonzero()[:, 0].tolist():
                    final[alive[i]] = tokens[i, L:].tolist(), sum_logprobs[i].item()
                keep = (~done).nonzero()[:, 0]
                alive = [alive[i] for i in keep.tolist()]
                tokens, sum_logprobs, done, too_long, x = tokens[keep], sum_logprobs[keep], done[keep], too_long[keep], x[keep]
                cache.reorder(keep)
            continue

        # beam search: per window, the best G unfinished continuations of its G beams
        logprobs = F.log_softmax(logits, dim=-1)
        top_logprobs, top_tokens = logprobs.topk(G + 1, dim=-1)
        scores_all = (sum_logprobs[:, None] + top_logprobs).tolist()
        top_tokens, prefixes = top_tokens.tolist(), tokens.tolist()
        next_seqs, sources, new_sums = [], [], []
        for i in range(B):
            scores, source = {}, {}
            for r in range(i * G, (i + 1) * G):
                for score, token in zip(scores_all[r], top_tokens[r]):
                    seq = tuple(prefixes[r] + [token])
                    scores[seq], source[seq] = score, r
            newly_finished, kept = {}, 0
            for seq in sorted(scores, key=scores.get, reverse=True):
                if seq[-1] == eot:
                    newly_finished[seq] = scores[seq]
                else:
                    next_seqs.append(seq)
                    sources.append(source[seq])
                    new_sums.append(scores[seq])
                    kept += 1
                    if kept == G:
                        break
            for seq in sorted(newly_finished, key=newly_finished.get, reverse=True):
                if len(finished[i]) >= max_candidates:
                    break
                finished[i][seq] = newly_finished[seq]
        tokens = torch.tensor(next_seqs, device=dev)
        sum_logprobs = torch.tensor(new_sums, device=dev)
        if sources != list(range(N)):
            (static or cache).reorder(torch.tensor(sources, device=dev), cross=False)
        x = tokens[:, -1:]
        if all(len(f) >= max_candidates for f in finished) or step + 1 > int(too_long.min()):
            break

    # candidates per window, ranked by logprob over length
    if beam:
        sums = sum_logprobs.view(B, G).tolist()
        for i in range(B):
            if len(finished[i]) < G:  # not enough finished: add the best unfinished
                for j in sorted(range(G), key=lambda j: sums[i][j])[::-1]:
                    finished[i][tuple(tokens[i * G + j].tolist() + [eot])] = sums[i][j]
                    if len(finished[i]) >= G:
                        break
        candidates = [[list(seq[L:]) for seq in f] for f in finished]
        cand_sums = [list(f.values()) for f in finished]
    else:
        for i, (row_tokens, row_sum) in enumerate(zip(tokens[:, L:].tolist(), sum_logprobs.tolist())):
            final[alive[i]] = row_tokens, row_sum
        candidates = [[final[r][0] for r in range(i * G, (i + 1) * G)] for i in range(B)]
        cand_sums = [[final[r][1] for r in range(i * G, (i + 1) * G)] for i in range(B)]
    results = []
    for i in range(B):
        seqs = [s[:s.index(eot)] if eot in s else s for s in candidates[i]]
        lengths = [len(s) for s in seqs]
        if o.length_penalty is None:
            penalties = [max(n, 1) for n in lengths]
        else:
            penalties = [((5 + n) / 6) ** o.length_penalty for n in lengths]
        best = max(range(len(seqs)), key=lambda j: cand_sums[i][j] / penalties[j])
        text = tokenizer.decode(seqs[best]).strip()
        results.append(DecodingResult(
            tokens=seqs[best], text=text, language=languages[i], avg_logprob=cand_sums[i][best] / (lengths[best] + 1),
            no_speech_prob=no_speech_probs[i],
            temperature=o.temperature, compression_ratio=compression_ratio(text)))
    if gates and model.dims.dual:
        _add_gates(model, base, rows, [initial[i] + r.tokens for i, r in enumerate(results)], [len(s) for s in initial], results)
    return results


def _add_gates(model, base, rows, sequences, starts, results):
    """The gate value (mean over layers) at the step that chose each sampled token, from one more
    pass of the decoder over each window's final tokens (one window at a time: the pass keeps
    every attention map)."""
    dev = base.self_kv[0][0].device
    for row, seq, start, r in zip(rows, sequences, starts, results):
        if all(layer[1] is None for layer in base.cross):  # closed gates (official weights): no secondary branch
            r.gates = [0.0] * len(r.tokens)
            continue
        details = []
        model.decoder.hidden(torch.tensor([seq], device=dev), kv_cache=base.rows([row], len(seq)), details=details)
        gates = torch.stack([d["gate"][0] for d in details]).float().mean(dim=0).tolist()  # (T,)
        r.gates = gates[start - 1:start - 1 + len(r.tokens)]


@torch.no_grad()
def decode(model, mel, options=DecodingOptions(), tokenizer=None, **kwargs):
    """Decode 30-second windows as openai-whisper's `decode` does: mel (n_mels, 3000) or a batch
    (B, n_mels, 3000), or their encoder features. Returns a DecodingResult, or a list of them."""
    from dataclasses import replace

    single = mel.ndim == 2
    mel = mel[None] if single else mel
    options = replace(options, **kwargs) if kwargs else options
    tokenizer = tokenizer or model_tokenizer(model)
    base = KVCache(model, encode_audio(model, mel), 1)
    B = mel.shape[0]
    language_probs = [None] * B
    if options.language is None and tokenizer.multilingual:
        languages, language_probs = detect_language(model, base, tokenizer)
    else:
        languages = [tokenizer.to_language_code(options.language) if options.language else "en"] * B
    results = decode_windows(model, tokenizer, base, list(range(B)), options, languages, gates=True)
    for r, p in zip(results, language_probs):
        r.language_probs = p
    return results[0] if single else results


@torch.no_grad()
def greedy_decode(model, mel, tokenizer, prompt=None, max_tokens=None):
    """Greedy decoding of a batch of 30-second windows, without timestamps. mel: (B, n_mels, 3000);
    prompt: the initial tokens (default: the start of transcript and <|notimestamps|>). Returns
    one list of text tokens per window (end of text left out)."""
    B = mel.shape[0]
    prompt = prompt or tokenizer.sot_sequence() + [tokenizer.no_timestamps]
    options = DecodingOptions(without_timestamps=True, sample_len=max_tokens)
    base = KVCache(model, encode_audio(model, mel), 1)
    results = decode_windows(model, tokenizer, base, list(range(B)), options, [tokenizer.language or "en"] * B, initial=[list(prompt)] * B)
    return [r.tokens for r in results]


# -----------------------------------------------------------------------------
# word timestamps: openai-whisper's method. Some cross-attention heads (the checkpoint's alignment
# heads) look at the audio frames being spoken as each token is read; dynamic time warping finds
# the monotonic path of strongest attention from tokens to frames, and each word takes the times
# where the path enters its first token and leaves its last. Heuristics then trim words that
# swallow pauses, exactly as openai-whisper's do, so that the same weights give the same times.

PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # merged into the word that follows
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"  # merged into the word before
_SENTENCE_ENDS = ".。!！?？"
_NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}  # words split where characters end, not at spaces


def alignment_heads(model):
    """The (layer, head) pairs whose cross-attention follows the speech in time: the checkpoint's
    generation_config["alignment_heads"], or, as openai-whisper without a list, every head of the
    decoder's second half. On dual models these are heads of the primary branch (`cross_attn`),
    the official one that the heads were found in; the second branch has no known alignment heads."""
    heads = model.generation_config.get("alignment_heads")
    if not heads:
        L, H = model.dims.n_text_layer, model.dims.n_text_head
        heads = [(layer, head) for layer in range(L // 2, L) for head in range(H)]
    return sorted((int(layer), int(head)) for layer, head in heads)


def median_filter(x, width):
    """Median over a sliding window of odd `width` along the last dimension, reflected at the ends."""
    assert width > 0 and width % 2 == 1, "the median filter's width must be odd"
    pad = width // 2
    if x.shape[-1] <= pad:  # too short to reflect
        return x
    return F.pad(x, (pad, pad), mode="reflect").unfold(-1, width, 1).sort()[0][..., pad]


def dtw(cost):
    """The monotonic path of least total cost through `cost` (N tokens, M frames), from (0, 0) to
    (N - 1, M - 1), moving diagonally, to the next token or to the next frame; on ties the next
    frame, and sums kept in float32, as openai-whisper does, so that paths are the same. The
    table is filled an anti-diagonal at a time (each depends on the two before it only).
    Returns the token indices and the frame indices along the path."""
    x = np.asarray(cost, dtype=np.float64)
    N, M = x.shape
    total = np.full((N + 1, M + 1), np.inf, dtype=np.float32)
    total[0, 0] = 0
    step = np.zeros((N + 1, M + 1), dtype=np.int8)  # 0: diagonal, 1: from the previous token, 2: from the previous frame
    for d in range(2, N + M + 1):
        i = np.arange(max(1, d - M), min(N, d - 1) + 1)
        j = d - i
        diag, up, left = total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]
        t = np.where((diag < up) & (diag < left), 0, np.where((up < diag) & (up < left), 1, 2))
        total[i, j] = x[i - 1, j - 1] + np.choose(t, [diag, up, left])  # float64 sum, stored as float32
        step[i, j] = t
    step[0, :], step[:, 0] = 2, 1  # along the edges, straight back to the start
    i, j, path = N, M, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = step[i, j]
        i, j = (i - 1, j - 1) if t == 0 else (i - 1, j) if t == 1 else (i, j - 1)
    path = np.array(path[::-1]).T
    return path[0], path[1]


def split_to_word_tokens(tokenizer, tokens, language="en"):
    """Group tokens into words: (words, tokens of each word). A word starts at a token whose text
    begins with a space, at punctuation and at special tokens; in languages written without
    spaces (Chinese, Japanese, Thai, ...) wherever a whole character ends."""
    pieces, piece_tokens = _split_on_unicode(tokenizer, tokens)
    if language in _NO_SPACE_LANGUAGES:
        return pieces, piece_tokens
    words, word_tokens = [], []
    for piece, toks in zip(pieces, piece_tokens):
        if not words or toks[0] >= tokenizer.eot or piece.startswith(" ") or piece.strip() in string.punctuation:
            words.append(piece)
            word_tokens.append(list(toks))
        else:
            words[-1] += piece
            word_tokens[-1].extend(toks)
    return words, word_tokens


def _split_on_unicode(tokenizer, tokens):
    """Pieces of the fewest tokens that decode to whole characters (a character's bytes may span
    tokens; a replacement character that is in the full text is a character of its own)."""
    full = tokenizer.decode_with_timestamps(tokens)
    pieces, piece_tokens, current, offset = [], [], [], 0
    for token in tokens:
        current.append(token)
        text = tokenizer.decode_with_timestamps(current)
        if "\ufffd" not in text or full[offset + text.index("\ufffd")] == "\ufffd":
            pieces.append(text)
            piece_tokens.append(current)
            current = []
            offset += len(text)
    return pieces, piece_tokens


@torch.no_grad()
def find_alignment(model, tokenizer, features, text_tokens, num_frames, language="en", task="transcribe", medfilt_width=7):
    """Words of `text_tokens` with their start and end in seconds from the window's start and the
    mean probability of their tokens, for one window: features (1, n_audio_ctx, C) of its audio,
    whose first num_frames mel frames hold sound. The decoder reads the text after the start of
    transcript and <|notimestamps|>; the alignment heads' attention over the sounding frames,
    normalised per frame over the tokens and median filtered in time, is what DTW follows."""
    if not text_tokens:
        return []
    start = tokenizer.sot_sequence(language, task) + [tokenizer.no_timestamps]
    tokens = torch.tensor([start + list(text_tokens) + [tokenizer.eot]], device=features.device)
    details = []
    logits = model.decoder(tokens, features, details=details)[0]  # (T, n_vocab); details: per layer, weights (1, H, T, S)
    probs = logits[len(start) - 1:-2, :tokenizer.eot].float().softmax(dim=-1)  # the distribution each text token was read from
    token_probs = probs[torch.arange(len(text_tokens)), torch.tensor(text_tokens)].tolist()

    weights = torch.stack([details[layer]["cross_attn"][0, head] for layer, head in alignment_heads(model)])  # (heads, T, S)
    weights = weights[:, :, :num_frames // 2].float().cpu()
    weights = weights / weights.sum(dim=-1, keepdim=True)  # the softmax over the sounding frames only, as openai-whisper's
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std, medfilt_width)
    matrix = weights.mean(dim=0)[len(start) - 1:-1]  # (text tokens + end of text, frames)
    token_index, frame_index = dtw(-matrix)

    words, word_tokens = split_to_word_tokens(tokenizer, list(text_tokens) + [tokenizer.eot], language)
    if len(word_tokens) <= 1:  # the end of text alone
        return []
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))  # first token of each word, and the end of text
    enters = np.pad(np.diff(token_index), (1, 0), constant_values=1).astype(bool)  # where the path reaches a new token
    times = frame_index[enters] / TOKENS_PER_SECOND
    return [dict(word=w, tokens=t, start=float(times[a]), end=float(times[b]), probability=float(np.mean(token_probs[a:b])))
            for w, t, a, b in zip(words, word_tokens, bounds[:-1], bounds[1:])]


def merge_punctuations(alignment, prepended=PREPEND_PUNCTUATIONS, appended=APPEND_PUNCTUATIONS):
    """In place: opening punctuation (a word of its own after a space) joins the word after it,
    closing punctuation the word before it; the emptied entries stay, as ''."""
    following = len(alignment) - 1
    for i in range(len(alignment) - 2, -1, -1):
        prev, nxt = alignment[i], alignment[following]
        if prev["word"].startswith(" ") and prev["word"].strip() in prepended:
            nxt["word"], nxt["tokens"] = prev["word"] + nxt["word"], prev["tokens"] + nxt["tokens"]
            prev["word"], prev["tokens"] = "", []
        else:
            following = i
    previous = 0
    for j in range(1, len(alignment)):
        prev, nxt = alignment[previous], alignment[j]
        if not prev["word"].endswith(" ") and nxt["word"] in appended:
            prev["word"], prev["tokens"] = prev["word"] + nxt["word"], prev["tokens"] + nxt["tokens"]
            nxt["word"], nxt["tokens"] = "", []
        else:
            previous = j


def add_word_timestamps(model, tokenizer, segments, features, num_frames, last_speech_timestamp, language="en", task="transcribe",
                        prepend_punctuations=PREPEND_PUNCTUATIONS, append_punctuations=APPEND_PUNCTUATIONS):
    """Give each segment of one window its `words` ({word, start, end, probability}, times in
    seconds of the file, rounded to 10 ms) with openai-whisper's corrections: a word longer than
    twice the median word (at most 0.7 s) is cut at a sentence end, and at a segment's start after
    a pause; a segment's start and end move to its words' unless a word runs 0.5 s past them.
    last_speech_timestamp: the end of the last word before this window."""
    if not segments:
        return
    per_segment = [[t for t in s["tokens"] if t < tokenizer.eot] for s in segments]
    alignment = find_alignment(model, tokenizer, features, [t for tokens in per_segment for t in tokens], num_frames, language, task)
    durations = np.array([w["end"] - w["start"] for w in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):  # words at sentence ends no longer than twice the median
        for prev, w in zip(alignment, alignment[1:]):
            if w["end"] - w["start"] > longest:
                if w["word"] in _SENTENCE_ENDS:
                    w["end"] = w["start"] + longest
                elif prev["word"] in _SENTENCE_ENDS:
                    w["start"] = w["end"] - longest
    merge_punctuations(alignment, prepend_punctuations, append_punctuations)

    time_offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    index = 0
    for segment, tokens in zip(segments, per_segment):
        taken, words = 0, []
        while index < len(alignment) and taken < len(tokens):  # the words of this segment's tokens
            w = alignment[index]
            if w["word"]:
                words.append(dict(word=w["word"], start=round(time_offset + w["start"], 2), end=round(time_offset + w["end"], 2),
                                  probability=w["probability"]))
            taken += len(w["tokens"])
            index += 1
        if words:
            first = words[0]
            # after a pause, the first words no longer than twice the median
            if first["end"] - last_speech_timestamp > median * 4 and (
                    first["end"] - first["start"] > longest or (len(words) > 1 and words[1]["end"] - first["start"] > longest * 2)):
                if len(words) > 1 and words[1]["end"] - words[1]["start"] > longest:
                    first["end"] = words[1]["start"] = max(words[1]["end"] / 2, words[1]["end"] - longest)
                first["start"] = max(0, first["end"] - longest)
            # the segment's own start and end, where its first or last word is too long
            if segment["start"] < first["end"] and segment["start"] - 0.5 > first["start"]:
                first["start"] = max(0, min(first["end"] - median, segment["start"]))
            else:
                segment["start"] = first["start"]
            if segment["end"] > words[-1]["start"] and segment["end"] + 0.5 < words[-1]["end"]:
                words[-1]["end"] = max(words[-1]["start"] + median, segment["end"])
            else:
                segment["end"] = words[-1]["end"]
            last_speech_timestamp = segment["end"]
        segment["words"] = words


def _words_end(segments):
    """The end of the last word, or of the last segment when none has words (None: no segments)."""
    return next((w["end"] for s in reversed(segments) for w in reversed(s["words"])), segments[-1]["end"] if segments else None)


def _is_anomaly(segment):
    """openai-whisper's guess that a segment is a hallucination: its first eight words (punctuation
    aside) are mostly improbable (p < 0.15), very short (< 0.133 s) or very long (> 2 s)."""
    if segment is None or not segment["words"]:
        return False
    words = [w for w in segment["words"] if w["word"] not in PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS][:8]
    score = sum(_anomaly_score(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def _anomaly_score(word):
    duration = word["end"] - word["start"]
    return (word["probability"] < 0.15) + max(0.0, 0.133 - duration) * 15 + max(0.0, duration - 2.0)


# -----------------------------------------------------------------------------
# transcription: 30-second windows, moved on by the timestamps the model predicts

MEL_CHUNK_FRAMES = 10 * 60 * FRAMES_PER_SECOND  # log-mel of long files computed 10 minutes at a time


def padded_log_mel(audio, n_mels=80, chunk_frames=MEL_CHUNK_FRAMES):
    """log_mel_spectrogram(audio, padding=N_SAMPLES) on the CPU, in chunks of frames for long
    audio, so that hours of audio never need one STFT of them all: the frames are the same
    (each chunk reads the samples its windows cover, reflect-padded at the ends as torch.stft
    does), and the clip to 8 below the peak is applied over the whole file."""
    audio = torch.as_tensor(audio, dtype=torch.float32).cpu()
    x = F.pad(audio, (0, N_SAMPLES))
    n_frames = x.shape[-1] // HOP_LENGTH
    if n_frames <= chunk_frames:
        return log_mel_spectrogram(x, n_mels)
    x = F.pad(x[None], (N_FFT // 2, N_FFT // 2), mode="reflect")[0]
    window, filters = torch.hann_window(N_FFT), mel_filters(n_mels)
    out = torch.empty(n_mels, n_frames)
    for a in range(0, n_frames, chunk_frames):
        b = min(a + chunk_frames, n_frames)
        stft = torch.stft(x[a * HOP_LENGTH:(b - 1) * HOP_LENGTH + N_FFT], N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        out[:, a:b] = torch.clamp(filters @ stft.abs() ** 2, min=1e-10).log10()
    out = torch.maximum(out, out.max() - 8.0)
    return (out + 4.0) / 4.0


def speech_chunks(mel, start=0, end=None, max_frames=N_FRAMES, pad=0.3, min_silence=0.6, smooth=0.2):
    """Cut frames [start, end) of a log-mel (n_mels, frames) into chunks of at most max_frames
    that hold all its speech and begin and end in silence: the (start, end) frames of each.

    A frame is speech when its loudness (the mean log-mel, averaged over `smooth` seconds) rises
    a fifth of the way from the file's quietest level (1st percentile) to its speech level (95th
    percentile). Stretches of speech, widened by `pad` seconds on each side and joined across
    silences shorter than `min_silence`, are then gathered in order into chunks while a chunk
    stays within max_frames; a stretch longer than that is cut at its quietest moment in the
    second half of each window. Silence between chunks is left out; a file of silence gives none."""
    end = mel.shape[-1] if end is None else end
    if end - start <= 0:
        return []
    level = mel[:, start:end].float().mean(0)
    k = max(1, round(smooth * FRAMES_PER_SECOND)) | 1
    level = F.avg_pool1d(level[None, None], k, 1, k // 2, count_include_pad=False)[0, 0]
    ranked = level.sort().values
    lo, hi = ranked[int(0.01 * (len(ranked) - 1))], ranked[int(0.95 * (len(ranked) - 1))]
    speech = (level > lo + 0.2 * (hi - lo)).tolist()
    widen, join = round(pad * FRAMES_PER_SECOND), round(min_silence * FRAMES_PER_SECOND)
    stretches = []  # (start, end) of speech, relative to `start`
    for i, (a, b) in enumerate(zip([False] + speech, speech + [False])):
        if b and not a:
            first = i
        elif a and not b:
            s0, s1 = max(0, first - widen), min(len(speech), i + widen)
            if stretches and s0 - stretches[-1][1] < join:
                s0 = stretches.pop()[0]
            stretches.append((s0, s1))
    pieces = []
    for a, b in stretches:
        while b - a > max_frames:  # one stretch longer than a window: cut where it is quietest
            half = a + max_frames // 2
            cut = half + int(level[half:a + max_frames].argmin())
            pieces.append((a, cut))
            a = cut
        pieces.append((a, b))
    chunks = []
    for a, b in pieces:
        if chunks and b - chunks[-1][0] <= max_frames:
            chunks[-1] = (chunks[-1][0], b)
        else:
            chunks.append((a, b))
    return [(start + a, start + b) for a, b in chunks]


@dataclass(frozen=True)
class _Rules:
    """What a transcription does besides decoding windows: openai-whisper's options of `transcribe`."""

    task: str = "transcribe"
    initial_prompt: str = None
    condition_on_previous_text: bool = True
    compression_ratio_threshold: float = 2.4
    logprob_threshold: float = -1.0
    no_speech_threshold: float = 0.6
    clip_timestamps: tuple = (0.0,)
    word_timestamps: bool = False
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    hallucination_silence_threshold: float = None


class _Transcript:
    """One file's way through openai-whisper's transcription loop, cut in two at the decoding of
    a window (`window`, then `add`), so that the windows of many files can decode together."""

    def __init__(self, model, tokenizer, mel, language, rules, clips):
        self.model, self.tokenizer, self.language, self.rules = model, tokenizer, language, rules
        self.mel = mel  # (n_mels, frames + 3000): the file's log-mel with 30 s of padding at the end
        self.frames = self.mel.shape[-1] - N_FRAMES
        self.prompt_tokens = _prompt_tokens(tokenizer, rules.initial_prompt) if rules.initial_prompt is not None else []
        self.all_tokens, self.segments = list(self.prompt_tokens), []
        self.prompt_reset_since = 0
        self.last_speech = 0.0  # the end of the last word (word timestamps)
        self.input_stride = N_FRAMES // model.dims.n_audio_ctx  # mel frames per output position: 2
        self.time_precision = self.input_stride * HOP_LENGTH / SAMPLE_RATE  # seconds per timestamp step: 0.02
        self.clips = clips  # (start, end) in mel frames: the parts of the file to transcribe
        self.clip, self.seek = 0, self.clips[0][0]
        self.bounded = False  # times never past the end of the clip (the chunks of a long file)

    def seconds(self, upto=None):
        """Seconds of audio its clips hold up to frame `upto` (default: all)."""
        upto = self.frames if upto is None else upto
        return sum(max(0, min(upto, b, self.frames) - a) for a, b in self.clips) / FRAMES_PER_SECOND

    @property
    def done(self):
        while self.clip < len(self.clips):  # move into the current clip, or on to the next
            start, end = self.clips[self.clip]
            self.seek = max(self.seek, start)
            if self.seek < end:
                return False
            self.clip += 1
            if self.clip < len(self.clips):
                self.seek = self.clips[self.clip][0]
        return True

    def window(self):
        """The mel window (n_mels, 3000) from the current position, and its prompt."""
        self.size = min(N_FRAMES, self.frames - self.seek, self.clips[self.clip][1] - self.seek)
        return pad_or_trim(self.mel[:, self.seek:self.seek + self.size], N_FRAMES), self.all_tokens[self.prompt_reset_since:]

    def add(self, result, features=None):
        """Take the decoded window: cut it into segments at pairs of timestamps and move on to the
        last complete segment's end (or past the window when it ends in silence). With word
        timestamps, align the words (features: the window's (1, n_audio_ctx, C) encoder output),
        move on to the last word's end, and with a hallucination_silence_threshold skip silences
        around segments that look like hallucinations. Returns (start, end, text) of the segments
        to show, as openai-whisper prints them."""
        seek, tb, rules = self.seek, self.tokenizer.timestamp_begin, self.rules
        skip = rules.no_speech_threshold is not None and result.no_speech_prob > rules.no_speech_threshold
        if skip and rules.logprob_threshold is not None and result.avg_logprob > rules.logprob_threshold:
            skip = False  # confident text despite the no-speech probability
        if skip:
            self.seek += self.size
            return []
        time_offset = float(seek * HOP_LENGTH / SAMPLE_RATE)
        tokens = result.tokens
        is_ts = [t >= tb for t in tokens]
        single_timestamp_ending = is_ts[-2:] == [False, True]
        cuts = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]  # between consecutive timestamps
        segments = []
        if cuts:
            if single_timestamp_ending:
                cuts.append(len(tokens))
            last = 0
            for cut in cuts:
                piece = range(last, cut)
                start = time_offset + (tokens[last] - tb) * self.time_precision
                end = time_offset + (tokens[cut - 1] - tb) * self.time_precision
                segments.append(self._segment(start, end, piece, result))
                last = cut
            if single_timestamp_ending:
                self.seek += self.size  # no speech after the last timestamp
            else:
                self.seek += (tokens[last - 1] - tb) * self.input_stride  # the unfinished segment is decoded again
        else:
            duration = self.size * HOP_LENGTH / SAMPLE_RATE
            timestamps = [t for t in tokens if t >= tb]
            if timestamps and timestamps[-1] != tb:
                duration = (timestamps[-1] - tb) * self.time_precision
            segments.append(self._segment(time_offset, time_offset + duration, range(len(tokens)), result))
            self.seek += self.size
        if rules.word_timestamps:
            add_word_timestamps(self.model, self.tokenizer, segments, features, self.size, self.last_speech, self.language, rules.task,
                                rules.prepend_punctuations, rules.append_punctuations)
            if not single_timestamp_ending:  # on from the last word's end rather than the last timestamp
                last_word = _words_end(segments)
                if last_word is not None and last_word > time_offset:
                    self.seek = round(last_word * FRAMES_PER_SECOND)
            if rules.hallucination_silence_threshold is not None:
                segments = self._without_hallucinations(segments, seek, time_offset, single_timestamp_ending)
                if segments is None:
                    return []
            last_word = _words_end(segments)
            if last_word is not None:
                self.last_speech = last_word
        if self.bounded:  # a chunk's segments and words end where the chunk ends, so that the next chunk's follow them
            limit = self.clips[self.clip][1] * HOP_LENGTH / SAMPLE_RATE
            for s in segments:
                for item in [s] + s.get("words", []):
                    item["end"] = max(item["start"], min(item["end"], limit))
        shown = [(s["start"], s["end"], s["text"]) for s in segments]
        for s in segments:  # an instantaneous or empty segment keeps its times only
            if s["start"] == s["end"] or not s["text"].strip():
                s["text"], s["tokens"] = "", []
                if rules.word_timestamps:
                    s["words"] = []
        for s in segments:
            s["id"] = len(self.segments)
            self.segments.append(s)
            self.all_tokens.extend(s["tokens"])
        if not rules.condition_on_previous_text or result.temperature > 0.5:
            self.prompt_reset_since = len(self.all_tokens)  # no prompt after a high-temperature window
        return shown

    def _without_hallucinations(self, segments, seek, time_offset, single_timestamp_ending):
        """openai-whisper's hallucination_silence_threshold: the segments to keep (None: none, the
        window is decoded again from its first words), with the position to go on from set. A
        segment that looks like a hallucination (`_is_anomaly`) and has silence (or another such
        segment) on both sides is dropped with all after it, and decoding goes on from its start."""
        threshold = self.rules.hallucination_silence_threshold
        window_end = float((seek + N_FRAMES) * HOP_LENGTH / SAMPLE_RATE)
        if not single_timestamp_ending:
            last_word = _words_end(segments)
            if last_word is not None and last_word > time_offset:  # on from the last word only after a long silence
                self.seek = round(last_word * FRAMES_PER_SECOND) if window_end - last_word > threshold else seek + self.size
        first = next((s for s in segments if s["words"]), None)
        if _is_anomaly(first) and first["start"] - time_offset > threshold:  # a silence, then perhaps a hallucination
            self.seek = seek + round((first["start"] - time_offset) * FRAMES_PER_SECOND)
            return None
        previous_end = self.last_speech
        for i, s in enumerate(segments):
            if not s["words"]:
                continue
            if _is_anomaly(s):
                following = next((x for x in segments[i + 1:] if x["words"]), None)
                next_start = following["words"][0]["start"] if following is not None else time_offset + self.size * HOP_LENGTH / SAMPLE_RATE
                silence_before = s["start"] - previous_end > threshold or s["start"] < threshold or s["start"] - time_offset < 2.0
                silence_after = next_start - s["end"] > threshold or _is_anomaly(following) or window_end - s["end"] < 2.0
                if silence_before and silence_after:
                    self.seek = round(max(time_offset + 1, s["start"]) * FRAMES_PER_SECOND)
                    if self.frames * HOP_LENGTH / SAMPLE_RATE - s["end"] < threshold:
                        self.seek = self.frames
                    return segments[:i]
            previous_end = s["end"]
        return segments

    def _segment(self, start, end, piece, result):
        tokens = [result.tokens[i] for i in piece]
        segment = dict(seek=self.seek, start=start, end=end, text=self.tokenizer.decode(tokens), tokens=tokens,
                       temperature=result.temperature, avg_logprob=result.avg_logprob,
                       compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob)
        if result.gates is not None:
            gates = [result.gates[i] for i in piece]
            segment["gate"] = sum(gates) / len(gates) if gates else None
        return segment

    def result(self):
        return dict(text=self.tokenizer.decode(self.all_tokens[len(self.prompt_tokens):]), segments=self.segments, language=self.language)


def _needs_fallback(r, rules):
    if (rules.no_speech_threshold is not None and r.no_speech_prob > rules.no_speech_threshold
            and rules.logprob_threshold is not None and r.avg_logprob < rules.logprob_threshold):
        return False  # silence: no use sampling it again
    too_repetitive = rules.compression_ratio_threshold is not None and r.compression_ratio > rules.compression_ratio_threshold
    too_unlikely = rules.logprob_threshold is not None and r.avg_logprob < rules.logprob_threshold
    return too_repetitive or too_unlikely


def transcribe(model, audio, *, batch_size=1, **options):
    """Transcribe one file (a path, or 16 kHz samples as numpy or torch). Returns {"text",
    "segments", "language"}; each segment holds id, seek, start, end, text, tokens, temperature,
    avg_logprob, compression_ratio, no_speech_prob, for dual models the mean gate value, and with
    word_timestamps=True its `words`, each {word, start, end, probability}.

    batch_size=1: openai-whisper's `transcribe`, window after window, each moved on by the
    timestamps the one before predicted and given its text as the prompt. batch_size > 1: the
    file is cut at silences into chunks of at most 30 s (`speech_chunks`) that are decoded
    independently, batch_size at a time, as faster-whisper's batched pipeline does: several
    times faster on long files, and no window is conditioned on the text of another chunk.
    Options: those of `transcribe_many` and `DecodingOptions`."""
    ((_, result),) = transcribe_many(model, [audio], batch_size=batch_size, chunked=batch_size > 1, **options)
    if isinstance(result, Exception):
        raise result
    return result


@torch.no_grad()
def transcribe_many(model, audios, *, batch_size=1, chunked=False, verbose=None, temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
                    compression_ratio_threshold=2.4, logprob_threshold=-1.0, no_speech_threshold=0.6,
                    condition_on_previous_text=True, initial_prompt=None, word_timestamps=False,
                    prepend_punctuations=PREPEND_PUNCTUATIONS, append_punctuations=APPEND_PUNCTUATIONS,
                    clip_timestamps="0", hallucination_silence_threshold=None, languages=None, **decode_options):
    """Transcribe files, decoding up to `batch_size` windows together. Checks the options at the
    call, then returns a generator of (index, result) as each file finishes, where result is what
    `transcribe` returns or the exception that file raised (unreadable, say), so that one bad file
    does not stop the others.

    chunked=False: each file goes through openai-whisper's sequential loop, and the current
    windows of up to batch_size files decode together (each file's result is what it gives
    alone). chunked=True: each file is cut at silences into chunks of at most 30 s
    (`speech_chunks`) that go through that loop independently (a chunk's prompt is its own text
    and initial_prompt only), batch_size chunks at a time, and each file's segments are put back
    in order: the way to decode one long file in batches.

    temperature: one, or a sequence tried in turn while a window's text is too repetitive
    (gzip compression ratio above compression_ratio_threshold) or too unlikely (mean logprob
    below logprob_threshold), unless it is silence (no-speech probability above
    no_speech_threshold). Windows whose no-speech probability is high and whose text is unlikely
    are skipped. condition_on_previous_text: give each window the text so far as its prompt.
    initial_prompt: text for the first window's prompt. languages: one per file, overriding
    decode_options["language"]; None detects each file's language (multilingual models) on its
    first 30 seconds. verbose: True prints each segment as it is decoded, False shows a progress
    bar. fp16, which openai-whisper's callers pass, is accepted and ignored: the model's own
    dtype is used.

    word_timestamps: give each segment its words with their times (openai-whisper's alignment:
    see `add_word_timestamps`), punctuation merged into the neighbouring words by
    prepend_punctuations and append_punctuations. clip_timestamps: "start,end,start,end,..." in
    seconds (or a list), the parts of each file to transcribe; a last start runs to the end.
    hallucination_silence_threshold (seconds, needs word_timestamps): skip silences longer than
    this around segments that look like hallucinations."""
    decode_options.pop("fp16", None)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    temperatures = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    tries = []  # the options of each try, checked now: a bad one fails at this call, not at some window's fallback
    for temp in temperatures:  # beam search at temperature 0, best_of samples above it
        kw = dict(decode_options, language=None)
        kw.pop("best_of" if temp == 0 else "beam_size", None)
        if temp > 0:
            kw.pop("patience", None)
        tries.append(DecodingOptions(**kw, temperature=temp))
    if isinstance(clip_timestamps, str):
        try:
            clip_timestamps = [float(t) for t in clip_timestamps.split(",")] if clip_timestamps.strip() else []
        except ValueError:
            raise ValueError(f"clip_timestamps must be seconds separated by commas (start,end,start,...), not {clip_timestamps!r}") from None
    if any(t < 0 for t in clip_timestamps):
        raise ValueError(f"clip_timestamps cannot be negative: {clip_timestamps}")
    rules = _Rules(tries[0].task, initial_prompt, condition_on_previous_text, compression_ratio_threshold, logprob_threshold,
                   no_speech_threshold, tuple(clip_timestamps), word_timestamps, prepend_punctuations, append_punctuations,
                   hallucination_silence_threshold if word_timestamps else None)
    return _transcribing(model, audios, batch_size, chunked, verbose, tries, rules, languages, decode_options.get("language"))


def _file_transcripts(model, tokenizer, audio, language, rules, chunked):
    """The _Transcripts of one file: one over its clips, or with chunked one per speech chunk,
    all reading the same log-mel."""
    if isinstance(audio, (str, Path)):
        path, audio = audio, load_audio(audio)
        if len(audio) == 0:
            raise ValueError(f"audio file {path} holds no samples")
    if language is not None:
        language = tokenizer.to_language_code(language) if tokenizer.multilingual else "en"
    elif not tokenizer.multilingual:
        language = "en"
    mel = padded_log_mel(audio, model.dims.n_mels)
    frames = mel.shape[-1] - N_FRAMES
    points = [round(t * FRAMES_PER_SECOND) for t in rules.clip_timestamps] or [0]
    if len(points) % 2:
        points.append(frames)  # the last clip runs to the end of the file
    clips = list(zip(points[::2], points[1::2]))  # (start, end) in mel frames
    if not chunked:
        return language, [_Transcript(model, tokenizer, mel, language, rules, clips)]
    if language is None:  # one language for all chunks: detected on the first 30 s, as openai-whisper does
        (language,), _ = detect_language(model, mel[None, :, :N_FRAMES], tokenizer)
    chunks = [c for a, b in clips for c in speech_chunks(mel, min(a, frames), min(b, frames))]
    transcripts = [_Transcript(model, tokenizer, mel, language, rules, [c]) for c in chunks]
    for t in transcripts:
        t.bounded = True
    return language, transcripts


def _joined(parts, language):
    """One file's result from its transcripts' results, in order of time."""
    if len(parts) == 1:
        return parts[0]
    segments = [s for p in parts for s in p["segments"]]
    for j, s in enumerate(segments):
        s["id"] = j
    return dict(text="".join(p["text"] for p in parts), segments=segments, language=language)


@torch.no_grad()  # (on the generator itself: transcribe_many returns it, and its own decorator ends there)
def _transcribing(model, audios, batch_size, chunked, verbose, tries, rules, languages, language_option):
    """transcribe_many's generator."""
    import tqdm

    tokenizer = model_tokenizer(model)
    several = not hasattr(audios, "__len__") or len(audios) > 1  # printed segments then say which file

    def files():  # (index, language, transcripts or the exception, label)
        for i, audio in enumerate(audios):
            label = f"{audio}: " if several and isinstance(audio, (str, Path)) else f"{i}: " if several else ""
            try:
                language, ts = _file_transcripts(model, tokenizer, audio, languages[i] if languages is not None else language_option,
                                                 rules, chunked)
            except (OSError, ValueError, RuntimeError) as e:
                yield i, None, e, label
                continue
            if chunked and verbose and tokenizer.multilingual and (languages is None and language_option is None):
                print(f"{label}Detected language: {LANGUAGES[language].title()}")
            yield i, language, ts, label

    pending = files()
    waiting = {}  # file index -> [its language, its transcripts' results (None until done)]
    active = []  # (file index, transcript number, _Transcript, label)
    with tqdm.tqdm(total=0, unit="s", unit_scale=True, disable=verbose is not False, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]") as bar:
        while True:
            while len(active) < batch_size:
                item = next(pending, None)
                if item is None:
                    break
                i, language, ts, label = item
                if isinstance(ts, Exception):
                    yield i, ts
                    continue
                waiting[i] = [language, [t.result() if t.done else None for t in ts]]
                for k, t in enumerate(ts):
                    if not t.done:
                        bar.total += t.seconds()
                        active.append((i, k, t, label))
                if all(r is not None for r in waiting[i][1]):
                    language, parts = waiting.pop(i)
                    yield i, _joined(parts, language) if parts else dict(text="", segments=[], language=language)
            bar.refresh()
            if not active:
                return

            now, active = active[:batch_size], active[batch_size:]  # a file's chunks may wait for the next round
            windows = [t.window() for _, _, t, _ in now]
            mel = torch.stack([w[0] for w in windows])
            features = encode_audio(model, mel)
            base = KVCache(model, features, 1)
            unknown = [j for j, (_, _, t, _) in enumerate(now) if t.language is None]
            if unknown:  # detect on the first 30 s, as openai-whisper does (padding included)
                first = torch.stack([now[j][2].mel[:, :N_FRAMES] for j in unknown])
                if torch.equal(first, mel[unknown]):
                    codes, _ = detect_language(model, base.rows(unknown, 1) if len(unknown) < len(now) else base, tokenizer)
                else:
                    codes, _ = detect_language(model, first, tokenizer)
                for j, code in zip(unknown, codes):
                    now[j][2].language = code
                    if verbose:
                        print(f"{now[j][3]}Detected language: {LANGUAGES[code].title()}")
            results = [None] * len(now)
            todo = list(range(len(now)))
            for options in tries:
                out = decode_windows(model, tokenizer, base, todo, options, [now[j][2].language for j in todo], [windows[j][1] for j in todo], gates=True)
                again = []
                for j, r in zip(todo, out):
                    results[j] = r
                    if _needs_fallback(r, rules):
                        again.append(j)
                todo = again
                if not todo:
                    break
            still = []
            for j, ((i, k, t, label), r) in enumerate(zip(now, results)):
                before = t.seconds(t.seek)
                for start, end, text in t.add(r, features[j:j + 1]):
                    if verbose:
                        print(f"{label}[{format_timestamp(start)} --> {format_timestamp(end)}] {text}", flush=True)
                done = t.done
                bar.update(t.seconds(t.seek) - before)
                if not done:
                    still.append((i, k, t, label))
                    continue
                waiting[i][1][k] = t.result()
                if all(p is not None for p in waiting[i][1]):
                    language, parts = waiting.pop(i)
                    yield i, _joined(parts, language)
            active = still + active


def format_timestamp(seconds, always_include_hours=False, decimal_marker="."):
    """12.5 -> "00:12.500" (hours shown when there are any, or always)."""
    ms = round(seconds * 1000.0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    hours_marker = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_marker}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


# -----------------------------------------------------------------------------
# text normalisation for word error rates


@lru_cache(maxsize=None)
def _text_normalizer(english):
    if english:
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def normalize_text(text, english=True):
    """Text as Whisper's own evaluations compare it, so that word error rates compare with
    published ones: openai-whisper's EnglishTextNormalizer (case, punctuation, fillers, contractions,
    titles, British spellings, spoken numbers and currencies as digits), or for other languages its
    BasicTextNormalizer (case, bracketed asides and symbols; letters and their diacritics kept).
    They come from the whisper-normalizer package, which carries openai-whisper's normalisers
    without the rest of it."""
    return " ".join(_text_normalizer(bool(english))(text).split())


ERROR_COUNTS = ("word_errors", "words", "char_errors", "chars")


def error_counts(refs, hyps, languages=None):
    """Word and character errors of transcripts against references, both normalised with
    normalize_text (English rules where a clip's language is English or unknown): a dict of
    ERROR_COUNTS summed over the clips, so that shares of a set (ranks, batches) add up. A
    reference with no words has no error rate and is left out; "clips" counts the others."""
    import jiwer

    out = dict.fromkeys(ERROR_COUNTS, 0)
    out["clips"] = 0
    for i, (ref, hyp) in enumerate(zip(refs, hyps)):
        english = languages is None or languages[i] in (None, "en")
        ref, hyp = normalize_text(ref or "", english), normalize_text(hyp or "", english)
        if not ref:
            continue
        w, c = jiwer.process_words(ref, hyp), jiwer.process_characters(ref, hyp)
        out["word_errors"] += w.substitutions + w.deletions + w.insertions
        out["words"] += w.hits + w.substitutions + w.deletions
        out["char_errors"] += c.substitutions + c.deletions + c.insertions
        out["chars"] += c.hits + c.substitutions + c.deletions
        out["clips"] += 1
    return out


def error_rates(counts):
    """(WER, CER) of summed error_counts; nan for a set without words."""
    wer = counts["word_errors"] / counts["words"] if counts["words"] else float("nan")
    cer = counts["char_errors"] / counts["chars"] if counts["chars"] else float("nan")
    return wer, cer


# -----------------------------------------------------------------------------
# the scripts' command lines


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default after its text, unless the text gives it already or
    there is none to give (None, False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default in ([], "", argparse.SUPPRESS) or "default" in text:
            return text
        return text + " (default: %(default)s)"


# -----------------------------------------------------------------------------
# devices


def usable_device(name):
    """torch.device(name) if this machine can run on it, else a ValueError that says why."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: expected cpu, cuda, cuda:N, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: " + ("this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"))
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name}: MPS is not available here")
    return device


# -----------------------------------------------------------------------------
# optional, x86 CPUs only: decoding with half-precision copies of the decoder's weights.
# A decoding step multiplies one row per window by every decoder weight and by the whole
# embedding (the logits), so its cost on a CPU is reading those weights from memory. Official
# checkpoints were released in float16, so their float32 weights are float16 numbers: fbgemm
# multiplies float32 rows by a packed float16 copy in float32, the same products from half the
# bytes (summed in another order: the last bits of the logits may differ). This section swaps
# modules in with one call and can be deleted with that call (sample.py, bench.py).


class HalfPackedLinear(Linear):
    """A Linear whose products without autograd use fbgemm's float16 copy of its weight; with
    autograd (training) it is the plain Linear. The parameters are the original module's."""

    @classmethod
    def wrap(cls, linear):
        new = cls.__new__(cls)
        new.__dict__ = dict(linear.__dict__)
        new.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())
        return new

    def forward(self, x):
        if torch.is_grad_enabled() or x.dtype != torch.float32:
            return super().forward(x)
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def use_half_precision_decoding(model, slices=16384):
    """Swap the decoder's Linear layers of a float32 model on an x86 CPU for HalfPackedLinear, and
    its output projection for products with float16 copies of the embedding (in slices of tokens),
    where the weights are float16 numbers (official checkpoints; the new branch of a dual model
    and fine-tuned weights are not, and keep their float32 products). For inference: weights
    changed afterwards are not seen. Returns the number of weights swapped (0 without fbgemm)."""
    dec = model.decoder
    exact = lambda w: w.device.type == "cpu" and w.dtype == torch.float32 and torch.equal(w.detach().half().float(), w.detach())
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return 0
    swapped = 0
    for module in list(dec.modules()):
        for name, child in module.named_children():
            if type(child) is Linear and exact(child.weight):
                setattr(module, name, HalfPackedLinear.wrap(child))
                swapped += 1
    if exact(dec.token_embedding.weight):
        packs = [torch.ops.quantized.linear_prepack_fp16(part, None) for part in dec.token_embedding.weight.detach().split(slices)]

        def project(x):  # the logits (..., n_vocab), as TextDecoder.project gives them
            if torch.is_grad_enabled():
                return TextDecoder.project(dec, x)
            return torch.cat([torch.ops.quantized.linear_dynamic_fp16(x.float(), p) for p in packs], dim=-1)
        dec.project = project
        swapped += 1
    return swapped


# -----------------------------------------------------------------------------
# optional, for GPUs: a decoding step with fixed shapes, compiled and replayed as a CUDA graph.
# A step of a small model is a few hundred small kernels, so a GPU decoding one file waits on
# the host that launches them. Here every tensor a step touches lives at a fixed address in
# fixed-size buffers (the self-attention keys and values of all n_text_ctx positions, the
# cross-attention keys and values, the rows' padding), the position is a tensor, and the
# step attends over all positions with a mask: torch.compile(mode="reduce-overhead") then
# captures it once per batch shape and replays it as one launch (gpt-fast's approach).
# decode_windows uses it when model.decoding_step is set; this section can be deleted with
# that attribute's three uses there (sample.py --compile sets it).


class StaticStep(nn.Module):
    """The decoder's one-token step for N rows of W windows (beams or samples: N // W rows
    each), over buffers of n_ctx positions. forward(tokens (N, 1), slot ()) -> states (N, 1, C)."""

    def __init__(self, model, cache, n_ctx):
        super().__init__()
        self.decoder = model.decoder
        N, H, _, D = cache.self_kv[0][0].shape
        like = cache.self_kv[0][0]
        for i, layer in enumerate(cache.cross):
            self.register_buffer(f"k{i}", like.new_zeros(N, H, n_ctx, D), persistent=False)
            self.register_buffer(f"v{i}", like.new_zeros(N, H, n_ctx, D), persistent=False)
            for j, kv in enumerate(layer):
                if kv is not None:
                    self.register_buffer(f"ck{i}_{j}", torch.zeros_like(kv[0]), persistent=False)
                    self.register_buffer(f"cv{i}_{j}", torch.zeros_like(kv[1]), persistent=False)
        self.register_buffer("pad", torch.zeros(N, dtype=torch.long, device=like.device), persistent=False)
        self.branches = [[kv is not None for kv in layer] for layer in cache.cross]

    def load(self, cache, offset):
        """Take a cache whose positions 0..offset-1 are written (the prompt): the rows' keys and
        values, their windows' cross-attention and their padding."""
        for i, (k, v) in enumerate(cache.self_kv):
            getattr(self, f"k{i}")[:, :, :offset].copy_(k[:, :, :offset])
            getattr(self, f"v{i}")[:, :, :offset].copy_(v[:, :, :offset])
            for j, kv in enumerate(cache.cross[i]):
                if kv is not None:
                    getattr(self, f"ck{i}_{j}").copy_(kv[0])
                    getattr(self, f"cv{i}_{j}").copy_(kv[1])
        self.pad.copy_(cache.pad if cache.pad is not None else torch.zeros_like(self.pad))

    def reorder(self, index):
        """Keep rows `index` (beams), in place."""
        for i in range(len(self.branches)):
            for name in (f"k{i}", f"v{i}"):
                buf = getattr(self, name)
                buf.copy_(buf[index])
        self.pad.copy_(self.pad[index])

    def forward(self, tokens, slot):
        dec = self.decoder
        n_ctx = self.k0.shape[2]
        keys = torch.arange(n_ctx, device=tokens.device)
        mask = ((keys <= slot) & (keys >= self.pad[:, None]))[:, None, None]  # (N, 1, 1, n_ctx)
        x = dec.token_embedding(tokens) + dec.positional_embedding[slot - self.pad][:, None]
        x = x.to(self.k0.dtype)
        for i, block in enumerate(dec.blocks):
            attn, k_buf, v_buf = block.attn, getattr(self, f"k{i}"), getattr(self, f"v{i}")
            h = block.attn_ln(x)
            k_buf.index_copy_(2, slot.view(1), attn.heads(attn.key(h)))
            v_buf.index_copy_(2, slot.view(1), attn.heads(attn.value(h)))
            y = F.scaled_dot_product_attention(attn.heads(attn.query(h)), k_buf, v_buf, attn_mask=mask)
            x = x + attn.out(y.transpose(1, 2).reshape(x.shape))
            # the rest of the block as ResidualAttentionBlock.forward computes it when decoding
            h = block.cross_attn_ln(x)
            a = block.cross_attn(h, (getattr(self, f"ck{i}_0"), getattr(self, f"cv{i}_0")))[0]
            if self.branches[i][1]:
                b = block.cross_attn2(block.cross_attn2_ln(x), (getattr(self, f"ck{i}_1"), getattr(self, f"cv{i}_1")))[0]
                a = block.fuse(h, a, b)[1]
            x = x + a
            x = x + block.mlp(block.mlp_ln(x))
        return dec.ln(x)


class StaticDecoding:
    """model.decoding_step: decode_windows' steps after the prompt through one StaticStep per batch
    shape, compiled whole (fullgraph) with torch.compile's `options` (default on CUDA:
    mode="reduce-overhead", CUDA graphs), or run as they are with compile=False."""

    def __init__(self, model, compile=True, **options):
        self.model, self.compile, self.steps, self.current = model, compile, {}, None
        if next(model.parameters()).device.type == "cuda" and not options:
            options = dict(mode="reduce-overhead")
        self.options = options

    def start(self, cache, offset):
        """A new decoding whose prompt filled the cache up to `offset`."""
        k = cache.self_kv[0][0]
        shape = (k.shape[0], cache.cross[0][0][0].shape[0], k.dtype, k.device, tuple(tuple(kv is not None for kv in layer) for layer in cache.cross))
        if shape not in self.steps:
            step = StaticStep(self.model, cache, self.model.dims.n_text_ctx)
            self.steps[shape] = (step, torch.compile(step, fullgraph=True, **self.options) if self.compile else step)
        self.current = self.steps[shape]
        self.current[0].load(cache, offset)

    def reorder(self, index, cross=False):
        self.current[0].reorder(index)

    def __call__(self, tokens, offset):
        return self.current[1](tokens, torch.tensor(offset, device=tokens.device))


def use_static_decoding(model, compile=True, **options):
    """Decode with fixed-shape steps (StaticStep), compiled with torch.compile's options by
    default (on CUDA: CUDA graphs). Returns the model."""
    model.decoding_step = StaticDecoding(model, compile, **options)
    return model
