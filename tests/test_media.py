"""Audio profiles, frame decoding, frame choice, transforms and local ImageNet weights, on real encoded files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from media import corrupt_file, frame_level, write_jpg, write_video, write_wav
from tunebal.data.audio import AUDIO_PROFILES, audio_features, fit_duration, load_clip_audio
from tunebal.data.transforms import frame_transform, normalize_on_device
from tunebal.data.video import decode_video_frames, list_frame_files, load_image_uint8, probe_video, segment_indices
from tunebal.errors import ConfigError, DataError
from tunebal.models.pretrained import load_imagenet_resnet18


@pytest.mark.parametrize(
    "name, shape", [("stft16k", (1, 257, 299)), ("stft16k-10s", (1, 257, 1004)), ("ogm22k", (1, 257, 188)), ("fbank", (1, 128, 1024))]
)
def test_audio_profiles_give_the_papers_shapes_on_a_real_wav(tmp_path, name, shape):
    path = write_wav(tmp_path / "a.wav", seconds=2.0, sr=44100, seed=0)
    out = load_clip_audio(path, AUDIO_PROFILES[name])
    assert out.shape == shape == AUDIO_PROFILES[name].shape and out.dtype == np.float32 and np.isfinite(out).all()


def test_stft_profile_matches_an_independent_librosa_computation(tmp_path):
    import librosa

    path = write_wav(tmp_path / "a.wav", seconds=3.5, sr=16000, seed=1)
    wave, _ = librosa.load(path, sr=16000)
    want = np.log(np.abs(librosa.stft(wave[:48000], n_fft=512, hop_length=159, center=False)) + 1e-7)
    np.testing.assert_allclose(load_clip_audio(path, AUDIO_PROFILES["stft16k"])[0], want, rtol=1e-5, atol=1e-5)


def test_start_offset_skips_into_the_clip_and_short_remainders_are_tiled(tmp_path):
    import librosa

    path = write_wav(tmp_path / "a.wav", seconds=2.0, sr=22050, seed=4, freq=500.0)
    wave, _ = librosa.load(path, sr=22050)
    rest = wave[int(0.5 * 22050):]  # 1.5 s left: tiled to 3 s (66150 samples)
    tiled = np.tile(rest, 2)[:66150]
    want = np.log(np.abs(librosa.stft(tiled, n_fft=512, hop_length=353)) + 1e-7)
    np.testing.assert_allclose(load_clip_audio(path, AUDIO_PROFILES["ogm22k"], start=0.5)[0], want, rtol=1e-5, atol=1e-5)


def test_short_clips_are_tiled_and_long_ones_cropped():
    wave = np.arange(5, dtype=np.float32)
    assert fit_duration(wave, 12).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert fit_duration(wave, 3).tolist() == [0, 1, 2]


def test_audio_track_of_an_mp4_decodes_to_the_same_shape(tmp_path):
    path = write_video(tmp_path / "v.mp4", seconds=2.0, fps=4, size_hw=(32, 32), seed=0, with_audio=True)
    out = load_clip_audio(path, AUDIO_PROFILES["stft16k-10s"])
    assert out.shape == (1, 257, 1004)
    tone = out[0, :, :40].mean(axis=1)
    assert abs(int(np.argmax(tone)) - round(300 / (16000 / 512))) <= 1  # the 300 Hz tone's bin


def test_video_frames_are_taken_at_one_per_second_in_time_order(tmp_path):
    path = write_video(tmp_path / "v.mp4", seconds=10.0, fps=4, size_hw=(32, 48), seed=3, with_audio=False)
    frames = decode_video_frames(path, fps=1.0, size=16)
    assert frames.shape == (10, 16, 16, 3) and frames.dtype == np.uint8
    levels = [int(round(f.mean())) for f in frames]
    want = [frame_level(3, i + 0.5) for i in range(10)]
    assert max(abs(a - b) for a, b in zip(levels, want)) <= 4, (levels, want)
    assert decode_video_frames(path, fps=1.0, size=16, max_frames=3).shape[0] == 3


@pytest.mark.parametrize("container", ["mp4", "flv"])
def test_a_3_s_clip_gives_3_frames_at_1_fps_and_probe_reads_the_header(tmp_path, container):
    path = write_video(tmp_path / f"v.{container}", seconds=3.0, fps=4, size_hw=(24, 32), seed=1, with_audio=True,
                       container=container)
    info = probe_video(path)
    assert (info.n_video, info.n_audio, info.width, info.height) == (1, 1, 32, 24)
    assert info.fps == pytest.approx(4.0) and info.duration == pytest.approx(3.0, abs=0.3)
    frames = decode_video_frames(path, fps=1.0, size=8)
    assert frames.shape == (3, 8, 8, 3) and frames.dtype == np.uint8
    levels = [int(round(f.mean())) for f in frames]
    assert max(abs(a - b) for a, b in zip(levels, [frame_level(1, t) for t in (0.5, 1.5, 2.5)])) <= 4, levels
    assert load_clip_audio(path, AUDIO_PROFILES["ogm22k"]).shape == (1, 257, 188)  # aac (mp4) / mp3 (flv) track


def test_video_frames_are_the_nearest_to_each_segment_middle(tmp_path):
    # 3 fps source (frames at k/3 s, the last at 8/3), 1.2 fps request: targets 0.417, 1.25, 2.083,
    # 2.917 s (all before the 3 s end); nearest frames 1/3, 4/3, 6/3, 8/3 s ("first frame at or after"
    # would give 2/3, 4/3, 7/3 and none for the last)
    path = write_video(tmp_path / "v.mp4", seconds=3.0, fps=3, size_hw=(16, 16), seed=2, with_audio=False)
    levels = [int(round(f.mean())) for f in decode_video_frames(path, fps=1.2, size=8)]
    want = [frame_level(2, k / 3) for k in (1, 4, 6, 8)]
    assert len(levels) == 4 and max(abs(a - b) for a, b in zip(levels, want)) <= 4, (levels, want)


def test_missing_streams_and_files_are_data_errors(tmp_path):
    silent = write_video(tmp_path / "silent.mp4", seconds=1.0, fps=4, size_hw=(16, 16), seed=0, with_audio=False)
    with pytest.raises(DataError, match="no audio stream"):
        load_clip_audio(silent, AUDIO_PROFILES["stft16k"])
    for call in (lambda p: decode_video_frames(p, 1.0, 8), probe_video, lambda p: load_clip_audio(p, AUDIO_PROFILES["stft16k"])):
        with pytest.raises(DataError) as info:
            call(tmp_path / "gone.mp4")
        assert str(tmp_path / "gone.mp4") in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        list_frame_files(tmp_path / "no-such-folder")


def test_image_resize_is_a_square_bilinear_resize_ignoring_aspect(tmp_path):
    from PIL import Image

    img = np.zeros((10, 40, 3), np.uint8)
    img[:, 20:] = 200  # right half bright
    Image.fromarray(img).save(tmp_path / "wide.png")
    out = load_image_uint8(tmp_path / "wide.png", 8)
    assert out.shape == (8, 8, 3)
    assert (out[:, :3] == 0).all() and (out[:, 5:] == 200).all()  # squeezed, not cropped: both halves remain


def test_frame_folders_sort_naturally_and_images_resize(tmp_path):
    for f in (10, 2, 1, 33):
        write_jpg(tmp_path / "clip" / f"frame_{f}.jpg", size_hw=(30, 40), seed=f)
    (tmp_path / "clip" / "notes.txt").write_text("x")
    assert [p.name for p in list_frame_files(tmp_path / "clip")] == ["frame_1.jpg", "frame_2.jpg", "frame_10.jpg", "frame_33.jpg"]
    img = load_image_uint8(tmp_path / "clip" / "frame_2.jpg", 24)
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8
    with pytest.raises(DataError, match="holds no"):
        (tmp_path / "empty").mkdir()
        list_frame_files(tmp_path / "empty")


def test_segment_indices_centre_in_evaluation_and_seeded_inside_segments_in_training():
    assert segment_indices(10, 2, False, None) == [2, 7]
    assert segment_indices(3, 1, False, None) == [1]
    assert segment_indices(2, 4, False, None) == [0, 0, 1, 1]  # fewer stored frames than asked: repeats
    picks = [segment_indices(10, 2, True, np.random.default_rng(s)) for s in range(200)]
    assert all(0 <= a < 5 <= b < 10 for a, b in picks)
    assert {a for a, _ in picks} == set(range(5))  # every index of the segment is drawn
    assert segment_indices(10, 2, True, np.random.default_rng(7)) == segment_indices(10, 2, True, np.random.default_rng(7))


@pytest.mark.parametrize("kind", ["wav", "jpg", "mp4"])
def test_corrupt_files_are_one_line_data_errors_naming_the_path(tmp_path, kind):
    if kind == "wav":
        path = corrupt_file(write_wav(tmp_path / "x.wav", 1.0, 16000, 0))
        call = lambda: load_clip_audio(path, AUDIO_PROFILES["ogm22k"])  # noqa: E731
    elif kind == "jpg":
        path = corrupt_file(write_jpg(tmp_path / "x.jpg", (20, 20), 0))
        call = lambda: load_image_uint8(path, 16)  # noqa: E731
    else:
        path = corrupt_file(write_video(tmp_path / "x.mp4", 1.0, 4, (16, 16), 0, with_audio=False))
        call = lambda: decode_video_frames(path, 1.0, 16)  # noqa: E731
    with pytest.raises(DataError) as info:
        call()
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_train_transform_crops_and_flips_all_frames_alike_and_is_seeded():
    clip = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    clip[:, :, :, :20] = 200  # left half bright
    clip[1] = clip[1] // 2
    train = frame_transform(True, 16)
    outs = []
    for seed in range(12):
        torch.manual_seed(seed)
        outs.append(train(clip))
    assert all(o.shape == (2, 3, 16, 16) and o.dtype == torch.uint8 for o in outs)
    flipped = [bool(o[0, 0, :, -1].float().mean() > o[0, 0, :, 0].float().mean()) for o in outs]
    assert any(flipped) and not all(flipped)  # the bright half moves right when flipped
    for o in outs:  # one crop/flip per clip: frame 1 is frame 0 halved
        torch.testing.assert_close(o[1].float(), (o[0].float() / 2).floor(), atol=2, rtol=0)
    torch.manual_seed(5)
    again = train(clip)
    assert torch.equal(again, outs[5])
    ev = frame_transform(False, 16)(clip)
    assert ev.shape == (2, 3, 16, 16) and torch.equal(ev, frame_transform(False, 16)(clip))


def test_normalize_on_device_is_imagenet_normalisation():
    x = torch.full((1, 1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_on_device(x)
    want = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, 0, :, 0, 0], want)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_local_imagenet_weights_land_and_a_planted_pickle_never_runs(tmp_path):
    from torchvision.models import resnet18

    from tunebal.models.encoders import resnet18_encoder

    source = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    enc = resnet18_encoder("spectrogram", 1, str(path))
    stem = enc.blocks[0][0].weight
    torch.testing.assert_close(stem, source.conv1.weight.mean(dim=1, keepdim=True))
    torch.testing.assert_close(enc.blocks[3][1].conv2.weight, source.layer4[1].conv2.weight)
    rgb = resnet18_encoder("frames", 3, str(path))
    torch.testing.assert_close(rgb.blocks[0][0].weight, source.conv1.weight)

    marker = tmp_path / "PWNED"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"conv1.weight": Planted()}, fh)
    with pytest.raises(ConfigError, match="not a plain tensor state dict"):
        resnet18_encoder("frames", 3, str(evil))
    assert not marker.exists()
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not a ResNet18 state dict"):
        resnet18_encoder("frames", 3, str(tmp_path / "other.pth"))


def test_audio_features_rejects_non_finite_and_empty_input():
    with pytest.raises(DataError):
        audio_features(np.array([np.nan, 1.0], dtype=np.float32), AUDIO_PROFILES["ogm22k"])
    with pytest.raises(DataError):
        audio_features(np.zeros(0, dtype=np.float32), AUDIO_PROFILES["ogm22k"])


def test_load_imagenet_resnet18_direct_averaging_and_one_line_errors(tmp_path):
    from torchvision.models import resnet18, resnet34

    source = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    net = resnet18(weights=None)
    net.conv1 = torch.nn.Conv2d(2, 64, 7, 2, 3, bias=False)  # 2-channel optical flow stem
    fc_before = net.fc.weight.clone()
    load_imagenet_resnet18(net, str(path), in_channels=2)
    want = source.conv1.weight.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1)
    torch.testing.assert_close(net.conv1.weight, want)
    torch.testing.assert_close(net.layer2[0].downsample[1].running_var, source.layer2[0].downsample[1].running_var)
    assert torch.equal(net.fc.weight, fc_before)  # fc.* is ignored
    torch.save(resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    bad_shape = dict(source.state_dict(), **{"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    torch.save(bad_shape, tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip or pickle")
    for name, match in [("missing.pth", "no such file"), ("r34.pth", "not a ResNet18"), ("shape.pth", "shape mismatch"),
                        ("junk.pth", "not a plain tensor")]:
        with pytest.raises(ConfigError, match=match) as info:
            load_imagenet_resnet18(resnet18(weights=None), str(tmp_path / name), in_channels=3)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


def test_audio_features_clip_the_waveform_to_unit_range():
    loud = (2.0 * np.sin(np.arange(66150) / 5.0)).astype(np.float32)
    np.testing.assert_array_equal(audio_features(loud, AUDIO_PROFILES["ogm22k"]),
                                  audio_features(np.clip(loud, -1.0, 1.0), AUDIO_PROFILES["ogm22k"]))
