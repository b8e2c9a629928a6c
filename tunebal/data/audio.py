"""Audio decoding and the one spectrogram function that every dataset shares.

``log_spectrogram`` is the preprocessing of the OGM-GE / OPM releases for CREMA-D and
Kinetics-Sounds (``np.log(np.abs(librosa.stft(samples, n_fft=512, hop_length=353)) + 1e-7)``,
giving 257 frequency bins); the synthetic dataset uses it too, with a smaller STFT.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tunebal.errors import DataError


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def log_spectrogram(wave: np.ndarray, n_fft: int, hop_length: int, eps: float = 1e-7) -> np.ndarray:
    """``log(|librosa.stft(wave)| + eps)`` as float32, shape ``(1 + n_fft // 2, 1 + len // hop_length)``.

    ``wave`` may carry leading batch dimensions, ``(..., n)`` -> ``(..., freq, time)``; each
    row is transformed independently, exactly as if passed alone. librosa's defaults apply:
    Hann window, ``win_length = n_fft``, centred frames with zero padding.
    """
    import librosa

    wave = np.asarray(wave)
    if wave.ndim == 0 or wave.shape[-1] == 0:
        raise DataError(f"cannot compute a spectrogram of an empty waveform (shape {wave.shape})")
    if not np.issubdtype(wave.dtype, np.floating):
        wave = wave.astype(np.float32)
    if not np.all(np.isfinite(wave)):
        raise DataError("cannot compute a spectrogram: the waveform holds NaN or Inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # n_fft larger than a very short signal
        spec = librosa.stft(wave, n_fft=n_fft, hop_length=hop_length)
    return np.log(np.abs(spec) + eps).astype(np.float32, copy=False)


def load_audio(path: str | os.PathLike, sr: int, duration: float | None = None) -> np.ndarray:
    """Decode ``path`` to a mono float32 waveform resampled to ``sr`` Hz, at most ``duration`` seconds.

    A missing, unreadable, corrupt or empty file raises a one-line ``DataError``.
    """
    import librosa

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"cannot decode audio file {path}: no such file")
    try:
        with warnings.catch_warnings():
            # librosa falls back to audioread (with a FutureWarning) when soundfile fails.
            warnings.simplefilter("ignore")
            wave, _ = librosa.load(path, sr=sr, mono=True, duration=duration)
    except Exception as exc:  # soundfile, audioread and resampling errors all mean "cannot decode"
        raise DataError(f"cannot decode audio file {path}: {_one_line(exc)}") from None
    if wave.size == 0:
        raise DataError(f"cannot decode audio file {path}: no samples")
    return np.ascontiguousarray(wave, dtype=np.float32)


# --------------------------------------------------------------------------- profiles
# The papers' audio preprocessing, each as a named, shape-checked profile. A clip is first
# brought to the profile's duration: longer clips are cropped from ``start``, shorter ones are
# tiled (the OGM-GE loader's ``np.tile(samples, 3)[:sr * 3]``: a repeated utterance keeps the
# spectrogram's statistics, where zero padding would add silence), then clipped to [-1, 1]
# as in that loader.


@dataclass(frozen=True)
class AudioProfile:
    """One audio preprocessing: sample rate, duration and the time-frequency transform.

    ``kind`` is ``"stft"`` (log-magnitude STFT, ``log(|STFT| + 1e-7)``) or ``"fbank"``
    (log-mel filterbank, ``log(mel power + 1e-6)``, padded/cropped to ``frames`` frames as
    AST-style pipelines do). ``shape`` is the exact output ``(1, F, T)``.
    """

    name: str
    sample_rate: int
    duration: float
    n_fft: int
    hop_length: int
    center: bool
    kind: str = "stft"
    n_mels: int = 0
    win_length: int | None = None
    frames: int = 0  # fbank: target frame count
    description: str = ""

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.duration))

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.kind == "fbank":
            return (1, self.n_mels, self.frames)
        n = self.num_samples
        t = 1 + n // self.hop_length if self.center else 1 + (n - self.n_fft) // self.hop_length
        return (1, 1 + self.n_fft // 2, t)

    def params(self) -> dict[str, Any]:
        """JSON-able parameters (hashed into a preparation's manifest)."""
        return {k: v for k, v in asdict(self).items() if k != "description"}


AUDIO_PROFILES: dict[str, AudioProfile] = {
    p.name: p
    for p in (
        AudioProfile("stft16k", 16000, 3.0, 512, 159, center=False,
                     description="AIM and OPM/OGM (TPAMI 2024) papers: 16 kHz, STFT window 512, hop 159, 3 s -> 257 x 299"),
        AudioProfile("stft16k-10s", 16000, 10.0, 512, 159, center=False,
                     description="the same for 10 s clips (Kinetics-Sounds) -> 257 x 1004"),
        AudioProfile("stft16k-5s-256", 16000, 5.0, 256, 128, center=True,
                     description="VGGSound pipelines (OPM/OGM, TPAMI 2024): 16 kHz, STFT 256, hop 128, 5 s -> 129 x 626"),
        AudioProfile("ogm22k", 22050, 3.0, 512, 353, center=True,
                     description="OGM-GE release loader: 22.05 kHz, 3 s, n_fft 512, hop 353, centred -> 257 x 188"),
        AudioProfile("fbank", 16000, 10.24, 400, 160, center=False, kind="fbank", n_mels=128, win_length=400, frames=1024,
                     description="log-mel filterbank as in AST (Audio Spectrogram Transformer) pipelines: 128 mel, 25 ms window, "
                                 "10 ms hop, 10.24 s (1022 frames, padded to 1024 with log(1e-6)); librosa mel, no dataset normalisation"),
    )
}


def fit_duration(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Crop to ``num_samples`` or tile a shorter clip up to it (OGM-GE loader)."""
    if wave.shape[-1] >= num_samples:
        return wave[..., :num_samples]
    reps = -(-num_samples // wave.shape[-1])
    return np.tile(wave, reps)[..., :num_samples]


def audio_features(wave: np.ndarray, profile: AudioProfile) -> np.ndarray:
    """``wave`` (mono, at ``profile.sample_rate``) -> float32 features of exactly ``profile.shape``."""
    import librosa

    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise DataError(f"audio_features expects a non-empty mono waveform, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)):
        raise DataError("cannot compute audio features: the waveform holds NaN or Inf")
    wave = np.clip(fit_duration(wave, profile.num_samples), -1.0, 1.0)
    if profile.kind == "stft":
        spec = librosa.stft(wave, n_fft=profile.n_fft, hop_length=profile.hop_length, center=profile.center)
        out = np.log(np.abs(spec) + 1e-7)[None]
    else:
        mel = librosa.feature.melspectrogram(
            y=wave, sr=profile.sample_rate, n_fft=profile.n_fft, hop_length=profile.hop_length,
            win_length=profile.win_length, n_mels=profile.n_mels, center=profile.center, power=2.0,
        )
        logmel = np.log(mel + 1e-6)
        frames = profile.frames
        if logmel.shape[1] < frames:
            logmel = np.pad(logmel, ((0, 0), (0, frames - logmel.shape[1])), constant_values=float(np.log(1e-6)))
        out = logmel[None, :, :frames]
    out = np.ascontiguousarray(out, dtype=np.float32)
    if out.shape != profile.shape:  # pragma: no cover - guards the profile arithmetic
        raise DataError(f"audio profile {profile.name}: produced {out.shape}, expected {profile.shape}")
    return out


_VIDEO_SUFFIXES = {".mp4", ".flv", ".mkv", ".webm", ".avi", ".mov", ".m4v"}


def _decode_with_av(path: str, sr: int) -> np.ndarray:
    """The first audio stream of a container (e.g. an mp4's track), mono float32 at ``sr`` Hz, via PyAV."""
    import av

    chunks = []
    with av.open(path) as container:
        if not container.streams.audio:
            raise DataError(f"cannot decode audio of {path}: no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)


def load_clip_audio(path: str | os.PathLike, profile: AudioProfile, start: float = 0.0) -> np.ndarray:
    """Decode ``path`` (a wav, or a video file's audio track) and return ``audio_features`` for ``profile``.

    Audio files go through librosa (resampled, mono); video containers through PyAV. A
    missing, corrupt or silent-less (empty) file raises a one-line ``DataError`` naming it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"cannot decode audio file {path}: no such file")
    if os.path.splitext(path)[1].lower() in _VIDEO_SUFFIXES:
        try:
            wave = _decode_with_av(path, profile.sample_rate)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot decode audio of {path}: {_one_line(exc)}") from None
    else:
        wave = load_audio(path, profile.sample_rate)
    offset = int(round(start * profile.sample_rate))
    wave = wave[offset:]
    if wave.size == 0:
        raise DataError(f"cannot decode audio file {path}: no samples after {start} s")
    return audio_features(wave, profile)
