"""``synth``: an embedded audio-visual(-text) dataset with built-in modality imbalance.

Generated deterministically from ``seed`` (no download), it mimics what makes CREMA-D and
Kinetics-Sounds hard for joint training: one modality is learnt fast and dominates, the
other carries information the first lacks but is learnt slowly, so a jointly trained model
under-uses it.

Classes. ``K = num_classes`` (even, 4..16) classes form ``G = K/2`` groups; class ``c`` and
class ``c + G`` share a group ``g = c mod G``.

- **audio** (kind ``"spectrogram"``, input ``(1, 129, 63)``): 0.5 s at 8 kHz; the group's
  sound plus white noise at ``audio_snr_db`` (relative to the sound's power), turned into a
  log-magnitude STFT by :func:`tunebal.data.audio.log_spectrogram` (n_fft 256, hop 64).
  The sound family is ``g mod 4`` (harmonic tone with 4 partials, linear up-chirp f0 -> 2 f0,
  amplitude-modulated tone at 6-12 Hz, two-tone chord f0 + 1.5 f0) at pitch register
  ``g // 4`` (f0 around 320 Hz or 880 Hz), with +-1 semitone pitch jitter and random phases.
  Audio therefore identifies the group, never which class of the pair: audio alone tops out
  at 2/K (50 % for 8 classes). It is the fast, dominant modality.
- **visual** (kind ``"frames"``, input ``(frames, 3, image_size, image_size)``): an oriented
  Gabor patch (random position, wavelength, phase and colour; the phase drifts across frames)
  in per-pixel Gaussian noise of std ``visual_noise`` (the patch's peak amplitude is 1).
  Class ``c`` has orientation ``c * 180/K`` degrees, so the two classes of a pair are
  orthogonal: vision alone tells every class apart, but neighbouring orientations
  (180/K degrees apart) are hard in heavy noise. It is the slow, under-used modality; with
  the audio's group it only has to decide between two orthogonal orientations.
- **text** (kind ``"vector"``, input ``(text_dim,)``, only with ``modalities=3``): a
  text-embedding-like feature vector ``text_signal * mu_c + N(0, I)``, where the class
  prototypes ``mu_c`` are fixed random unit vectors (the same for every seed). A weak
  (Bayes accuracy about 38 % for the defaults) but fast-to-learn third modality with
  information on every class, independent of the other two; in a joint model it competes
  with vision for the pair decision.

Values are not normalised further: spectrograms are raw log-magnitudes (about -10..5),
frames are centred on 0 (signal within [-1.5, 1.5] plus noise), vectors are as above.

Measured imbalance (defaults; per modality a 4-stage conv encoder, 16-32-64-128 channels,
stride 2, BN+ReLU, global average pool; concat fusion + linear head; SGD lr 0.05, momentum
0.9, weight decay 1e-4, cosine schedule, 15 epochs, batch 64; test accuracy, seeds 0/1/2):
audio alone 50.1/49.6/48.7 %, vision alone 92.6/90.5/80.6 %, joint 99.2/98.3/98.6 %, and
inside the joint model (audio features zeroed at the fusion input) vision only
48.6/37.6/36.2 %. With lr 0.02 the visual encoder's take-off depends on its initialisation
(alone 70.9/50.7/16.8 %; joint 94.6/89.4/71.4 %; inside the joint model 39.4/28.5/20.1 %).
With ``modalities=3`` (seed 0, lr 0.05): text alone 32.8 %, joint 97.1 %, inside the joint
model vision 48.3 % and text 29.0 %. A joint epoch takes about 7 s on one CPU thread.
Lowering ``visual_noise`` makes vision easy (1.4: alone about 95 % even with lr 0.02), which
leaves less to balance; raising it (2.0 with lr 0.05) makes vision's training fail for some
initialisations.

Splits draw from independent random streams keyed by (seed, split, modality): changing
``n_test`` or ``modalities`` leaves the other splits and modalities unchanged. Labels are
exactly balanced when a split's size is a multiple of ``K`` (``arange(n) % K``, shuffled).

Generated data is cached as an Arrow IPC file (no pickle) under ``$TUNEBAL_CACHE`` or
``~/.cache/tunebal``, named by a hash of the knob values and ``GENERATOR_VERSION``; the
file is written to a temporary name then renamed, so parallel trials can share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunebal.data.audio import log_spectrogram
from tunebal.data.arrays import read_array_file, write_array_file
from tunebal.data.base import SPLITS, DatasetSpec, MultimodalData, Split
from tunebal.errors import ConfigError, DataError
from tunebal.knobs import Knob, knobs

log = logging.getLogger(__name__)

# Bump whenever the generated data changes for the same knob values (invalidates caches).
GENERATOR_VERSION = 1

SAMPLE_RATE = 8000
DURATION = 0.5
N_FFT = 256
HOP_LENGTH = 64
NUM_SAMPLES = int(SAMPLE_RATE * DURATION)

FAMILIES = ("harmonic", "chirp", "am", "chord")
REGISTER_HZ = (320.0, 880.0)  # base f0 of the low and high pitch registers
PITCH_JITTER_SEMITONES = 1.0
CHANNELS = 3
_TEXT_PROTOTYPE_SEED = 20240531  # fixed: the text prototypes are part of the task, not of the sample
_STREAMS = {"labels": 0, "audio": 1, "visual": 2, "text": 3}
_CHUNK = 512  # samples per STFT chunk (bounds memory; results do not depend on it)

SYNTH_KNOBS = knobs(
    Knob("seed", "int", 0, "seed of the generator; the same knobs give bit-identical tensors", low=0, high=2**31 - 1),
    Knob("n_train", "int", 3200, "training samples (>= num_classes)", low=1, high=1_000_000),
    Knob("n_val", "int", 800, "validation samples (model selection)", low=1, high=1_000_000),
    Knob("n_test", "int", 1600, "test samples (scored once)", low=1, high=1_000_000),
    Knob(
        "num_classes",
        "int",
        8,
        "classes K (even); audio identifies K/2 pairs, vision the class",
        choices=(4, 6, 8, 10, 12, 14, 16),
    ),
    Knob("modalities", "int", 2, "2: audio+visual; 3: adds the weak 'text' vector modality", choices=(2, 3)),
    Knob("audio_snr_db", "float", 0.0, "signal-to-noise ratio of the audio waveform, dB", low=-30.0, high=60.0),
    Knob("visual_noise", "float", 1.75, "std of the pixel noise (the Gabor patch's amplitude is 1)", low=0.0, high=20.0),
    Knob("frames", "int", 1, "frames T per visual clip", low=1, high=16),
    Knob("image_size", "int", 32, "frame height and width in pixels", low=16, high=128),
    Knob("text_dim", "int", 32, "dimension of the text vector (modalities=3)", low=2, high=4096),
    Knob("text_signal", "float", 1.0, "norm of the class prototype in the text vector (noise std 1)", low=0.0, high=20.0),
)


# --------------------------------------------------------------------------- task layout


def class_layout(num_classes: int) -> list[dict[str, Any]]:
    """For each class: its group, sound family, pitch register, base f0 and orientation (degrees)."""
    _check_num_classes(num_classes)
    groups = num_classes // 2
    out = []
    for c in range(num_classes):
        g = c % groups
        family, register = FAMILIES[g % len(FAMILIES)], g // len(FAMILIES)
        out.append(
            {
                "group": g,
                "family": family,
                "register": register,
                "f0": REGISTER_HZ[register],
                "orientation": c * 180.0 / num_classes,
            }
        )
    return out


def class_names(num_classes: int) -> list[str]:
    names = []
    for info in class_layout(num_classes):
        sound = info["family"] + ("-high" if info["register"] else "")
        names.append(f"{sound}/{info['orientation']:g}deg")
    return names


def _check_num_classes(num_classes: int) -> None:
    if num_classes % 2 or not 4 <= num_classes <= 2 * len(FAMILIES) * len(REGISTER_HZ):
        raise ConfigError(f"synth: num_classes must be even and in [4, 16], got {num_classes}")


def _rng(seed: int, split: str, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), _STREAMS[stream]])


def split_size(values: dict[str, Any], split: str) -> int:
    return int(values[f"n_{split}"])


def split_labels(values: dict[str, Any], split: str) -> np.ndarray:
    """Labels of ``split``: ``arange(n) % K`` in a seeded random order (int64)."""
    n, k = split_size(values, split), values["num_classes"]
    return _rng(values["seed"], split, "labels").permutation(np.arange(n, dtype=np.int64) % k)


# --------------------------------------------------------------------------- audio


def waveforms(labels: np.ndarray, rng: np.random.Generator, num_classes: int, snr_db: float) -> np.ndarray:
    """Noisy waveforms ``(N, NUM_SAMPLES)`` float32 at ``SAMPLE_RATE`` for ``labels``.

    The clean sound (unit RMS) depends only on the class's group; white noise of power
    ``10^(-snr_db/10)`` is added. Every random draw comes from ``rng``, in a fixed order.
    """
    layout = class_layout(num_classes)
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    fam = np.array([FAMILIES.index(layout[c]["family"]) for c in labels], dtype=np.int64).reshape(n)
    base = np.array([layout[c]["f0"] for c in labels], dtype=np.float64).reshape(n)
    # Per-sample parameters, drawn for every sample whatever its family (fixed draw order).
    f0 = base * 2.0 ** (rng.uniform(-PITCH_JITTER_SEMITONES, PITCH_JITTER_SEMITONES, n) / 12.0)
    phases = rng.uniform(0.0, 2.0 * np.pi, (n, 4))
    fm = rng.uniform(6.0, 12.0, n)  # AM rate, Hz
    noise = rng.standard_normal((n, NUM_SAMPLES), dtype=np.float32)

    t = np.arange(NUM_SAMPLES, dtype=np.float64) / SAMPLE_RATE
    clean = np.zeros((n, NUM_SAMPLES), dtype=np.float64)
    two_pi = 2.0 * np.pi
    for fi, family in enumerate(FAMILIES):
        idx = np.flatnonzero(fam == fi)
        if idx.size == 0:
            continue
        f = f0[idx, None]
        ph = phases[idx]
        if family == "harmonic":
            sig = sum((1.0 / h) * np.sin(two_pi * h * f * t + ph[:, h - 1 : h]) for h in range(1, 5))
        elif family == "chirp":  # linear sweep f0 -> 2 f0 over the clip
            sig = np.sin(two_pi * (f * t + f * t**2 / (2.0 * DURATION)) + ph[:, :1])
        elif family == "am":
            sig = (1.0 + 0.9 * np.sin(two_pi * fm[idx, None] * t + ph[:, 1:2])) * np.sin(two_pi * f * t + ph[:, :1])
        else:  # chord: a fifth
            sig = np.sin(two_pi * f * t + ph[:, :1]) + np.sin(two_pi * 1.5 * f * t + ph[:, 1:2])
        clean[idx] = sig / np.sqrt(np.mean(sig**2, axis=1, keepdims=True))
    noise_std = 10.0 ** (-snr_db / 20.0)
    return (clean + noise_std * noise.astype(np.float64)).astype(np.float32)


def split_waveforms(values: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, waveforms) of ``split``: exactly the waveforms behind its spectrograms."""
    labels = split_labels(values, split)
    waves = waveforms(labels, _rng(values["seed"], split, "audio"), values["num_classes"], values["audio_snr_db"])
    return labels, waves


def spectrograms(waves: np.ndarray) -> np.ndarray:
    """``(N, 1, F, T)`` float32 log-magnitude spectrograms via :func:`log_spectrogram`."""
    n = waves.shape[0]
    n_frames = 1 + NUM_SAMPLES // HOP_LENGTH
    out = np.empty((n, 1, 1 + N_FFT // 2, n_frames), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        out[start : start + _CHUNK, 0] = log_spectrogram(waves[start : start + _CHUNK], N_FFT, HOP_LENGTH)
    return out


# --------------------------------------------------------------------------- visual


def gabor_frames(
    labels: np.ndarray, rng: np.random.Generator, num_classes: int, noise: float, frames: int, size: int
) -> np.ndarray:
    """``(N, frames, 3, size, size)`` float32 clips of a class-oriented Gabor patch in pixel noise."""
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    theta = np.deg2rad(labels * 180.0 / num_classes)
    centre = rng.uniform(-size / 8.0, size / 8.0, (n, 2))
    wavelength = size * rng.uniform(0.2, 0.3, n)
    sigma = 0.18 * size
    phase = rng.uniform(0.0, 2.0 * np.pi, n)
    drift = rng.uniform(-np.pi / 2, np.pi / 2, n)  # phase change per frame
    colour = rng.uniform(0.5, 1.5, (n, CHANNELS))
    pixel_noise = rng.standard_normal((n, frames, CHANNELS, size, size), dtype=np.float32)

    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    xs = coords[None, None, :] - centre[:, 0, None, None]  # (n, 1, W)
    ys = coords[None, :, None] - centre[:, 1, None, None]  # (n, H, 1)
    cos_t, sin_t = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    along = xs * cos_t + ys * sin_t  # (n, H, W)
    envelope = np.exp(-(xs**2 + ys**2) / (2.0 * sigma**2))
    carrier_arg = 2.0 * np.pi * along / wavelength[:, None, None]
    step = np.arange(frames, dtype=np.float64)
    ph = phase[:, None] + drift[:, None] * step[None, :]  # (n, T)
    patch = envelope[:, None] * np.cos(carrier_arg[:, None] + ph[:, :, None, None])  # (n, T, H, W)
    clean = patch[:, :, None] * colour[:, None, :, None, None]  # (n, T, C, H, W)
    return (clean + noise * pixel_noise.astype(np.float64)).astype(np.float32)


# --------------------------------------------------------------------------- text


def text_prototypes(num_classes: int, dim: int) -> np.ndarray:
    """Fixed unit-norm class prototypes ``(K, dim)`` (independent of the data seed)."""
    proto = np.random.default_rng([_TEXT_PROTOTYPE_SEED, num_classes, dim]).standard_normal((num_classes, dim))
    return proto / np.linalg.norm(proto, axis=1, keepdims=True)


def text_vectors(labels: np.ndarray, rng: np.random.Generator, num_classes: int, dim: int, signal: float) -> np.ndarray:
    proto = text_prototypes(num_classes, dim)
    noise = rng.standard_normal((labels.shape[0], dim))
    return (signal * proto[labels] + noise).astype(np.float32)


# --------------------------------------------------------------------------- assembly


def modality_names(count: int) -> tuple[str, ...]:
    return ("audio", "visual", "text")[:count]


KINDS = {"audio": "spectrogram", "visual": "frames", "text": "vector"}


def _check(values: dict[str, Any]) -> None:
    _check_num_classes(values["num_classes"])
    if values["n_train"] < values["num_classes"]:
        raise ConfigError(
            f"synth: n_train ({values['n_train']}) must be at least num_classes ({values['num_classes']})"
        )


def generate_split(values: dict[str, Any], split: str) -> dict[str, np.ndarray]:
    """Arrays of one split: ``labels`` and one entry per modality."""
    seed, k = values["seed"], values["num_classes"]
    labels, waves = split_waveforms(values, split)
    out = {"labels": labels, "audio": spectrograms(waves)}
    del waves
    out["visual"] = gabor_frames(
        labels, _rng(seed, split, "visual"), k, values["visual_noise"], values["frames"], values["image_size"]
    )
    if values["modalities"] >= 3:
        out["text"] = text_vectors(labels, _rng(seed, split, "text"), k, values["text_dim"], values["text_signal"])
    return out


def generate(values: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """All splits as numpy arrays (no cache). ``values`` must be resolved knob values."""
    _check(values)
    return {split: generate_split(values, split) for split in SPLITS}


def _to_data(values: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]], cache: str | None) -> MultimodalData:
    mods = modality_names(values["modalities"])
    splits = {}
    for split in SPLITS:
        a = arrays[split]
        splits[split] = Split(
            inputs={m: torch.from_numpy(np.ascontiguousarray(a[m])) for m in mods},
            labels=torch.from_numpy(np.ascontiguousarray(a["labels"], dtype=np.int64)),
        )
    return MultimodalData(
        name="synth",
        modalities=mods,
        kinds={m: KINDS[m] for m in mods},
        num_classes=values["num_classes"],
        class_names=class_names(values["num_classes"]),
        info={
            "knobs": dict(values),
            "generator_version": GENERATOR_VERSION,
            "sample_rate": SAMPLE_RATE,
            "n_fft": N_FFT,
            "hop_length": HOP_LENGTH,
            "cache": cache,
        },
        **splits,
    )


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """``$TUNEBAL_CACHE`` or ``~/.cache/tunebal``."""
    root = os.environ.get("TUNEBAL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "tunebal"


def cache_key(values: dict[str, Any]) -> str:
    blob = json.dumps({"dataset": "synth", "version": GENERATOR_VERSION, "knobs": values}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(values: dict[str, Any]) -> Path:
    return cache_dir() / "synth" / f"synth-v{GENERATOR_VERSION}-{cache_key(values)}.arrow"


def _write_cache(path: Path, values: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]]) -> None:
    meta = {"dataset": "synth", "generator_version": GENERATOR_VERSION, "knobs": values}
    flat = {f"{split}/{key}": arr for split in SPLITS for key, arr in arrays[split].items()}
    write_array_file(path, flat, meta)


def _read_cache(path: Path, values: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    flat, meta = read_array_file(path)
    if meta.get("generator_version") != GENERATOR_VERSION or meta.get("knobs") != json.loads(json.dumps(values)):
        raise DataError(f"cache {path} was written for other knobs")
    arrays: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
    for name, arr in flat.items():
        split, key = name.split("/", 1)
        arrays[split][key] = arr
    mods = modality_names(values["modalities"])
    for split in SPLITS:
        missing = {"labels", *mods} - set(arrays[split])
        if missing:
            raise DataError(f"cache {path} lacks {split}/{sorted(missing)}")
    return arrays


def memory_estimate(values: dict[str, Any]) -> tuple[int, int]:
    """(bytes of the finished arrays, peak bytes while generating them): float32 spectrograms,
    frames and text vectors, int64 labels; generation adds one split's float64 waveforms,
    noise and Gabor intermediates."""
    n_total = sum(split_size(values, s) for s in SPLITS)
    n_max = max(split_size(values, s) for s in SPLITS)
    pixels = values["frames"] * CHANNELS * values["image_size"] ** 2
    per_sample = 8 + 4 * (1 + N_FFT // 2) * (1 + NUM_SAMPLES // HOP_LENGTH) + 4 * pixels
    if values["modalities"] >= 3:
        per_sample += 4 * values["text_dim"]
    # one split at a time: audio (float64 clean + float32 noise + its float64 copy + the float64
    # sum + the float32 waveform) is freed before the visual (float32 noise, float64 patch,
    # clean, noise copy and sum)
    transient = max(NUM_SAMPLES * (8 + 4 + 8 + 8 + 4), pixels * (4 + 8 + 8 + 8 + 8))
    final = n_total * per_sample
    return final, final + n_max * transient


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable), or 0 when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil comes with ray
        return 0


def check_memory(values: dict[str, Any], generating: bool) -> None:
    """Refuse, before allocating anything, a synth dataset larger than the available memory."""
    final, peak = memory_estimate(values)
    need = peak if generating else final
    have = available_memory()
    if have and need > have:
        sizes = ", ".join(f"n_{s}={split_size(values, s)}" for s in SPLITS)
        raise ConfigError(
            f"synth: {sizes} needs about {need / 2**30:.1f} GiB of memory "
            f"({'to generate' if generating else 'to load'}), more than the {have / 2**30:.1f} GiB available; "
            "use fewer samples (--data n_train=...)"
        )


def build_synth(*, use_cache: bool = True, **values: Any) -> MultimodalData:
    """Build ``synth`` from resolved knob values, reading or filling the verified Arrow cache.

    A cache file that fails verification (tunebal/data/arrays.py) is reported with one
    warning line naming the file and regenerated (and rewritten).
    """
    values = SYNTH_KNOBS.resolve(values, where="synth: ")  # idempotent; also fills defaults
    _check(values)
    path = cache_path(values) if use_cache else None
    if path is not None and path.exists():
        check_memory(values, generating=False)
        try:
            return _to_data(values, _read_cache(path, values), str(path))
        except DataError as exc:  # truncated, corrupt, edited or foreign file: regenerate and overwrite it
            log.warning("synth: regenerating the corrupt cache %s (%s)", path, " ".join(str(exc).split()))
    check_memory(values, generating=True)
    arrays = generate(values)
    if path is not None:
        try:
            _write_cache(path, values, arrays)
        except OSError as exc:  # a read-only or full disk only costs regeneration next time
            warnings.warn(f"synth: could not write cache {path}: {exc}", RuntimeWarning, stacklevel=2)
            path = None
    return _to_data(values, arrays, None if path is None else str(path))


SPEC = DatasetSpec(
    name="synth",
    description="embedded audio-visual(-text) data with modality imbalance (audio dominates, vision is needed)",
    knobs=SYNTH_KNOBS,
    build=build_synth,
)
