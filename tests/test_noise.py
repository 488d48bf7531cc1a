"""The noise section of dualwhisper.py, which training and evaluation share: each kind at the SNR
asked for, measured over the clip; what each kind is; bad settings; SpecAugment inside the clip."""

import numpy as np
import pytest
import torch

import dualwhisper as dw
import prepare


def measured_snr(clean, noisy, n):
    noise = (noisy - clean)[:n].double()
    return 10 * np.log10(float(clean[:n].double().pow(2).mean() / noise.pow(2).mean()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("kind", dw.NOISE_KINDS)
def test_noise_hits_the_requested_snr(kind, corpus, device):
    """On the device that training mixes on (the noise is drawn there)."""
    val, bank = prepare.PreparedSplit(corpus, "train"), prepare.PreparedSplit(corpus, "noise")
    idx = list(range(4))
    lengths = [int(val.lengths[i]) for i in idx]
    audio = torch.from_numpy(val.batch(idx, n_samples=max(lengths) + 1600)[0]).to(device)  # (4, n), zero after each clip
    for snr in (-5.0, 0.0, 7.5, 20.0):
        mixer = dw.NoiseMixer.fixed(kind, snr, bank=bank, pool=val)
        noisy = mixer(audio, lengths, keys=idx, exclude=idx)
        assert noisy.device == audio.device
        for b, n in enumerate(lengths):
            assert abs(measured_snr(audio[b].cpu(), noisy[b].cpu(), n) - snr) < 0.5, (kind, snr, b)
            assert torch.equal(noisy[b, n:], audio[b, n:]), "the noise must stop where the clip ends"
    assert torch.equal(noisy, mixer(audio, lengths, keys=idx, exclude=idx)), "the same keys must give the same noise"
    # whatever the batch: a clip mixed alone, or beside longer ones (the mixer stops at the batch's longest clip)
    for b in range(len(idx)):
        alone = mixer(audio[b:b + 1, :lengths[b] + 7], lengths[b:b + 1], keys=idx[b:b + 1], exclude=idx[b:b + 1])
        assert torch.equal(alone[0], noisy[b, :lengths[b] + 7]), b
    assert not torch.equal(noisy, mixer(audio, lengths, keys=[k + 100 for k in idx], exclude=idx))


def test_noise_kinds_are_what_they_say(corpus):
    pool, bank = prepare.PreparedSplit(corpus, "train"), prepare.PreparedSplit(corpus, "noise")
    n = 4 * dw.SAMPLE_RATE
    # coloured noise: the slope of the power spectrum in log-log is 0, -1, -2
    for colour, slope in (("white", 0), ("pink", -1), ("brown", -2)):
        x = dw.coloured_noise((8, 2**16), colour, generator=torch.Generator().manual_seed(0))
        psd = (torch.fft.rfft(x).abs() ** 2).mean(0)[1:].double().numpy()
        f = np.arange(1, len(psd) + 1)
        fit = np.polyfit(np.log(f[10:]), np.log(psd[10:]), 1)[0]
        assert abs(fit - slope) < 0.15, (colour, fit)
    speech = torch.from_numpy(pool.batch([0])[0])
    L = int(pool.lengths[0])
    # talker: another clip of the pool (never the clip itself), scaled, starting in the first half
    r = dw.NoiseMixer.fixed("talker", 10, pool=pool).draw(5, L, exclude=0)
    (j, start), = r["pieces"]
    assert j != 0 and 0 <= start < L // 2
    noisy = dw.NoiseMixer.fixed("talker", 10, pool=pool)(speech, [L], [5], exclude=[0])
    other = torch.from_numpy(pool.audio(j).astype(np.float32) / 32768)[: L - start]
    added = (noisy - speech)[0, start:start + len(other)]
    scale = float(added @ other / (other @ other))
    assert scale > 0 and torch.allclose(added, scale * other, atol=1e-5)
    # bank: a looped stretch of a recording of the bank
    r = dw.NoiseMixer.fixed("bank", 0, bank=bank).draw(3, n)
    (j, offset), = r["pieces"]
    rec = bank.audio(j).astype(np.float32) / 32768
    expected = rec[(offset + np.arange(n)) % len(rec)]
    got = dw.NoiseMixer.fixed("bank", 0, bank=bank).noise([r], [n], n)[0].numpy()
    assert np.allclose(got, expected)
    # no noise at all for a clean draw, and probabilities as asked
    m = dw.NoiseMixer({"white": 0.5, "babble": 0.25}, pool=pool)
    kinds = [m.draw(k, n)["kind"] for k in range(4000)]
    assert abs(kinds.count("white") / 4000 - 0.5) < 0.03 and abs(kinds.count("babble") / 4000 - 0.25) < 0.03
    assert abs(kinds.count(None) / 4000 - 0.25) < 0.03
    clean_key = kinds.index(None)
    assert torch.equal(m(speech, [L], [clean_key], exclude=[0]), speech)
    # SNR drawn inside the range
    m = dw.NoiseMixer({"pink": 1.0}, snr_db=(3, 6))
    snrs = [m.draw(k, n)["snr_db"] for k in range(200)]
    assert 3 <= min(snrs) < 3.5 and 5.5 < max(snrs) <= 6


def test_noise_mixer_rejects_bad_settings(corpus):
    pool = prepare.PreparedSplit(corpus, "train")
    with pytest.raises(ValueError, match="unknown noise kind 'rain'"):
        dw.NoiseMixer({"rain": 0.5})
    with pytest.raises(ValueError, match="sum to at most 1"):
        dw.NoiseMixer({"white": 0.7, "pink": 0.6})
    with pytest.raises(ValueError, match="needs a noise bank"):
        dw.NoiseMixer({"bank": 0.5})
    with pytest.raises(ValueError, match="pool of at least two"):
        dw.NoiseMixer({"babble": 0.5}, pool=[np.zeros(10)])
    assert dw.NoiseMixer({"babble": 0.5}, pool=pool).kinds == ["babble"]


def test_spec_augment_masks_inside_the_clip():
    mel = torch.randn(3, 80, 3000)
    frames = [300, 1000, 3000]
    out = dw.spec_augment(mel, frames, keys=[1, 2, 3], time_width=0.1)
    changed = out != mel
    assert changed.any()
    for b, n in enumerate(frames):
        assert not changed[b, :, n:].any(), "masks stay inside the clip"
        bins = changed[b, :, :n].all(dim=1).sum()  # frequency masks cover the clip's frames
        cols = changed[b].all(dim=0).sum()  # time masks cover every bin
        assert 0 < bins + cols and bins <= 2 * 27 and cols <= 2 * int(0.1 * n)
    assert torch.equal(out, dw.spec_augment(mel, frames, keys=[1, 2, 3], time_width=0.1))


