"""Real encoded media files for tests: wav (soundfile), jpg (Pillow), mp4/flv (PyAV). Nothing is downloaded.

Each writer's content depends on its seed, so tests can recognise which frame or clip they read:
a JPEG is a colour ramp around :func:`jpg_colour`, a video frame's colour ramps with time.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def write_wav(path: Path, seconds: float, sr: int, seed: int, freq: float = 440.0) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.4 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.shape)
    sf.write(path, wave.astype(np.float32), sr, subtype="PCM_16")
    return path


def jpg_colour(seed: int) -> np.ndarray:
    """The mean RGB colour of :func:`write_jpg`'s image for ``seed`` (a ramp around it, so crops and flips show)."""
    return np.random.default_rng(seed).integers(30, 225, 3).astype(np.float64)


def write_jpg(path: Path, size_hw: tuple[int, int], seed: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size_hw
    ramp = np.linspace(-25.0, 25.0, w)[None, :, None] * np.linspace(-1.0, 1.0, h)[:, None, None]  # mean 0, not flip-symmetric
    ramp = ramp + np.linspace(-20.0, 20.0, w)[None, :, None]
    img = np.clip(jpg_colour(seed)[None, None, :] + ramp, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=95)
    return path


def frame_level(seed: int, t: float) -> int:
    """The grey level :func:`write_video` paints at time ``t`` (seconds)."""
    return int(20 + (seed * 7) % 40 + 50 * t) % 256


def write_video(path: Path, seconds: float, fps: int, size_hw: tuple[int, int], seed: int,
                with_audio: bool, container: str = "mp4") -> Path:
    """A real encoded video (mp4: mpeg4 + aac; flv: flv1 + mp3), grey level ramping with time."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size_hw
    with av.open(str(path), mode="w", format=container) as out:
        vstream = out.add_stream("mpeg4" if container == "mp4" else "flv", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = w, h, "yuv420p"
        astream = None
        if with_audio:
            sr = 22050 if container == "flv" else 16000
            astream = out.add_stream("aac" if container == "mp4" else "libmp3lame", rate=sr)
            astream.layout = "mono"
        for i in range(int(round(seconds * fps))):
            img = np.full((h, w, 3), frame_level(seed, i / fps), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in vstream.encode(frame):
                out.mux(packet)
        for packet in vstream.encode():
            out.mux(packet)
        if astream is not None:
            sr = astream.rate
            t = np.arange(int(seconds * sr)) / sr
            wave = (0.3 * np.sin(2 * np.pi * (300 + 20 * (seed % 5)) * t)).astype(np.float32)
            step = astream.codec_context.frame_size or 1024
            for k, start in enumerate(range(0, len(wave), step)):
                chunk = wave[start : start + step]
                if len(chunk) < step:
                    chunk = np.pad(chunk, (0, step - len(chunk)))
                frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
                frame.sample_rate = sr
                frame.pts = start
                for packet in astream.encode(frame):
                    out.mux(packet)
            for packet in astream.encode():
                out.mux(packet)
    return path


def corrupt_file(path: Path) -> Path:
    """Keep a few header bytes, garble the rest (a truncated, undecodable file)."""
    data = path.read_bytes()
    keep = data[: min(16, len(data) // 4)]
    path.write_bytes(keep + bytes((i * 37) % 251 for i in range(64)))
    return path
