"""The audio front end: log-mel against openai-whisper on real audio, file formats, resampling."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import dualwhisper as dw
from conftest import need


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_openai_whisper(jfk_audio, n_mels):
    whisper = need("whisper")
    audio = torch.from_numpy(jfk_audio)
    ref = whisper.audio.log_mel_spectrogram(audio, n_mels, padding=dw.N_SAMPLES)
    ours = dw.log_mel_spectrogram(audio, n_mels, padding=dw.N_SAMPLES)
    assert ours.shape == ref.shape == (n_mels, (len(jfk_audio) + dw.N_SAMPLES) // dw.HOP_LENGTH)
    assert (ours - ref).abs().max().item() < 1e-4
    # the filterbank itself, computed in code, against the one openai-whisper ships
    assert (dw.mel_filters(n_mels) - whisper.audio.mel_filters("cpu", n_mels)).abs().max().item() < 1e-6


def test_log_mel_batched_equals_one_by_one(jfk_audio):
    a = jfk_audio[: 16000 * 5]
    b = jfk_audio[16000 * 5: 16000 * 10] * 0.05  # a quieter item: its own dynamic range
    batch = dw.log_mel_spectrogram(torch.from_numpy(np.stack([a, b])), 80)
    for i, x in enumerate((a, b)):
        assert torch.allclose(batch[i], dw.log_mel_spectrogram(x, 80), atol=1e-6)


def test_stft_stops_at_the_zero_padding_with_the_same_bits():
    """log_mel_spectrogram leaves out the STFT of frames past every row's last nonzero sample (the
    padding of a short clip): against the STFT of every frame."""
    def every_frame(x):
        stft = torch.stft(x, dw.N_FFT, dw.HOP_LENGTH, window=torch.hann_window(dw.N_FFT), return_complex=True)
        mel = torch.clamp(dw.mel_filters(80) @ stft[..., :-1].abs() ** 2, min=1e-10).log10()
        return (torch.maximum(mel, mel.amax(dim=(-2, -1), keepdim=True) - 8.0) + 4.0) / 4.0

    g, n = torch.Generator().manual_seed(0), dw.N_SAMPLES
    # ends at the start, inside the first frame, at 3 s, close enough to the end that its reflection
    # reaches the clip, at the end; and a batch whose rows end in different places
    for lengths in ([0], [1], [16000 * 3], [n - 250], [n - 100], [n], [16000, 0, 16000 * 7 + 3, 12345]):
        x = torch.zeros(len(lengths), n)
        for b, L in enumerate(lengths):
            x[b, :L] = torch.randn(L, generator=g) * 0.1
        assert torch.equal(dw.log_mel_spectrogram(x), every_frame(x)), lengths
        assert torch.equal(dw.log_mel_spectrogram(x[-1]), every_frame(x[-1])), lengths


def _sine(sr, seconds, freqs):
    t = np.arange(int(sr * seconds)) / sr
    return sum(0.3 * np.sin(2 * np.pi * f * t) for f in freqs).astype(np.float32)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampling_is_band_limited_and_accurate(sr):
    freqs = [440.0, 3000.0] if sr > 8000 else [440.0, 2500.0]
    y = dw.resample(_sine(sr, 2.0, freqs), sr, 16000)
    expected = _sine(16000, 2.0, freqs)
    assert abs(len(y) - len(expected)) <= 1
    interior = slice(800, 31200)  # away from the edges' zero padding
    assert np.abs(y[interior] - expected[interior]).max() < 1e-4
    # torch tensors and batches of rows resample as numpy rows one by one
    rows = np.stack([_sine(sr, 0.5, [440.0]), _sine(sr, 0.5, [1000.0])])
    batch = dw.resample(torch.from_numpy(rows), sr, 16000)
    assert torch.is_tensor(batch) and batch.dtype == torch.float32
    assert all(np.array_equal(batch[i].numpy(), dw.resample(rows[i], sr, 16000)) for i in range(2))
    if sr > 20000:  # tones above the new Nyquist frequency must not alias into the band
        for hz in (8200.0, 10000.0):
            alias = dw.resample(_sine(sr, 1.0, [hz]), sr, 16000)
            assert np.sqrt(np.mean(alias[800:-800] ** 2)) < 0.3 / np.sqrt(2) * 1e-5, hz  # > 100 dB down


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "FLOAT"),
                                         ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_load_audio_formats(tmp_path, jfk_audio, fmt, subtype):
    import soundfile as sf

    clip = jfk_audio[: 16000 * 3]
    stereo = np.stack([clip, clip * 0.5], axis=1)  # mono mix is the channel mean
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, 16000, format=fmt, subtype=subtype)
    got = dw.load_audio(path)
    expected = clip * 0.75
    if fmt in ("OGG", "MP3"):  # lossy at a low rate: the best-aligned correlation must be high
        assert abs(len(got) - len(expected)) < 3000
        n = min(len(got), len(expected)) - 400
        best = max(np.corrcoef(got[200 + lag: 200 + lag + n - 400], expected[200: n - 200])[0, 1] for lag in range(-150, 151, 1))
        assert best > 0.9
    else:
        tolerance = {"PCM_U8": 1 / 64, "PCM_16": 1e-4, "PCM_24": 1e-6, "FLOAT": 1e-7}[subtype]
        assert len(got) == len(expected)
        assert np.abs(got - expected).max() < tolerance


def test_load_audio_resamples_any_rate_and_channel_count(tmp_path, jfk_audio):
    import soundfile as sf

    clip = jfk_audio[: 16000 * 2]
    at_48k = dw.resample(clip, 16000, 48000)
    six = np.stack([at_48k] * 6, axis=1)
    sf.write(tmp_path / "six.wav", six, 48000, subtype="PCM_24")
    got = dw.load_audio(tmp_path / "six.wav")
    assert abs(len(got) - len(clip)) <= 1
    assert np.abs(got[400:-400] - clip[400: len(got) - 400]).max() < 0.02


def test_load_audio_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        dw.load_audio(tmp_path / "missing.wav")
    (tmp_path / "empty.m4a").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.m4a is empty"):
        dw.load_audio(tmp_path / "empty.m4a")
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    with pytest.raises(ValueError, match="cannot decode audio file .*junk.wav"):
        dw.load_audio(tmp_path / "junk.wav")
    # without PyAV, a format soundfile does not read says what to install
    monkeypatch.setitem(sys.modules, "av", None)
    (tmp_path / "talk.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    with pytest.raises(ValueError, match=r"cannot decode audio file .*talk.m4a .*install PyAV: pip install av$"):
        dw.load_audio(tmp_path / "talk.m4a")


def _encode(path, fmt, codec, audio, sr):
    """A stereo file (left: audio, right: half of it) written with PyAV's encoders."""
    av = need("av")
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sr, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([audio, audio * 0.5]).astype(np.float32), format="fltp", layout="stereo")
        frame.sample_rate = sr
        for f in (frame, None):
            out.mux(stream.encode(f))


@pytest.mark.parametrize("fmt,codec,ext,sr", [("ipod", "aac", "m4a", 16000), ("mp4", "aac", "mp4", 44100),
                                              ("webm", "libopus", "webm", 48000)])
def test_load_audio_containers_through_pyav(tmp_path, jfk_audio, fmt, codec, ext, sr):
    """Formats soundfile does not read come through PyAV: mixed down, resampled, and the same speech
    (AAC starts with 1024 samples of encoder delay, which decoders that ignore the edit list keep)."""
    clip = jfk_audio[: 16000 * 3]
    path = tmp_path / f"clip.{ext}"
    _encode(path, fmt, codec, dw.resample(clip, 16000, sr), sr)
    got = dw.load_audio(path)
    expected = clip * 0.75
    delay = 1024 * 16000 // sr if codec == "aac" else 0
    assert abs(len(got) - len(expected) - delay) < 1100
    n = len(expected) - 2400
    lag = max(range(delay - 60, delay + 61), key=lambda k: np.dot(got[1200 + k: 1200 + k + n], expected[1200: 1200 + n]))
    assert np.corrcoef(got[1200 + lag: 1200 + lag + n], expected[1200: 1200 + n])[0, 1] > 0.97  # lossy codecs at their default rates
    if shutil.which("ffmpeg"):  # what openai-whisper reads through the ffmpeg program: the same samples
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-ar", "16000", "-"]
        ref = np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.float32)
        assert abs(len(ref) - len(got)) <= 2
        m = min(len(ref), len(got)) - 400
        assert np.corrcoef(ref[400:m], got[400:m])[0, 1] > 0.999
