"""Decoded frames are what a viewer sees: display-matrix rotation and flips, sample aspect ratio.

Clips get a real display matrix the way files in the wild do, in the mp4 ``tkhd`` box:
rotations with ffmpeg (``-c copy -metadata:s:v:0 rotate=N``; re-encoding would write an
identity matrix), flips by writing the ``tkhd`` matrix bytes (Debian's ffmpeg 5.1 has no
``-display_hflip``; its mov muxer writes FFmpeg's display matrix there as is, which is
what the patch does). Anamorphic clips: ``h264_metadata`` sets the SAR without re-encoding.
ffmpeg's own autorotate (on by default) is the reference for the direction.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from media import make_clip

from stadapter.config import ConfigError, SamplingConfig, TaskSpec
from stadapter.video import VideoLimits, decode_clip, decode_frames
from stadapter.video.preprocess import FrameConverter, Orientation, frame_orientation, orientation_from_matrix

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs the ffmpeg command line tool (apt-get install ffmpeg)")

REPO = Path(__file__).resolve().parents[2]
U, W1 = 1 << 16, 1 << 30  # 1.0 in 16.16 and in 2.30 fixed point

# FFmpeg display matrices [a b u; c d v; x y w] (a point (x, y) shows at x' = a x + c y, y' = b x + d y)
MATRICES = {
    "hflip": (-U, 0, 0, 0, U, 0, 0, 0, W1),
    "vflip": (U, 0, 0, 0, -U, 0, 0, 0, W1),
    "rot90_hflip": (0, -U, 0, -U, 0, 0, 0, 0, W1),  # a transpose-like mirror
    "rot90_vflip": (0, U, 0, U, 0, 0, 0, 0, W1),
}
# what each display matrix does to a [H, W, 3] picture (np.rot90 turns counter-clockwise)
EXPECTED = {
    "rotate=90": lambda a: np.rot90(a, 1),
    "rotate=180": lambda a: np.rot90(a, 2),
    "rotate=270": lambda a: np.rot90(a, 3),
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "rot90_hflip": lambda a: np.rot90(a[:, ::-1], 3),
    "rot90_vflip": lambda a: np.rot90(a[:, ::-1], 1),
}


def pattern(i: int, size: tuple[int, int]) -> np.ndarray:
    """Asymmetric: a bright square in the top-left corner, a grey bar along the top, a moving gradient."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.repeat(((xx + 2 * yy + 3 * i) % 64 + 40).astype(np.uint8)[..., None], 3, axis=2)
    img[: h // 8, :] = 140
    img[: h // 4, : w // 4] = (250, 250, 30)
    return img


def encode(path: Path, size: tuple[int, int], frames: int = 6) -> Path:
    with av.open(str(path), mode="w") as out:
        s = out.add_stream("libx264", rate=10, options={"qp": "0", "preset": "ultrafast"})
        s.width, s.height = size
        s.pix_fmt = "yuv444p"  # lossless, no chroma subsampling: decoded pixels are the pattern's
        for i in range(frames):
            out.mux(s.encode(av.VideoFrame.from_ndarray(pattern(i, size), format="rgb24")))
        out.mux(s.encode(None))
    return path


def ffmpeg(*args: str) -> bytes:
    return subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-y", *args], check=True, capture_output=True).stdout


def with_display(src: Path, dst: Path, how: str) -> Path:
    """A copy of ``src`` (no re-encoding) carrying the display matrix ``how``."""
    if how.startswith("rotate="):
        ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", how, str(dst))
        return dst
    data = bytearray(src.read_bytes())
    box = data.index(b"tkhd") - 4
    at = box + (48 if data[box + 8] == 0 else 60)  # the matrix field of a version 0 / 1 tkhd box
    data[at : at + 36] = struct.pack(">9i", *MATRICES[how])
    dst.write_bytes(bytes(data))
    return dst


def ffmpeg_view(path: Path, width: int, height: int) -> np.ndarray:
    """Every frame as ffmpeg shows it (autorotate on by default): uint8 [N, H, W, 3]."""
    raw = ffmpeg("-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-")
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return encode(tmp_path_factory.mktemp("display") / "plain.mp4", (64, 48))


# --- the matrix parser ---------------------------------------------------------------------------


def test_matrix_parser_follows_ffmpeg_conventions():
    def rot(deg: float) -> list[int]:  # av_display_rotation_set: counter-clockwise degrees
        r = np.radians(deg)
        c, s = np.cos(r), np.sin(r)
        return [round(c * U), round(-s * U), 0, round(s * U), round(c * U), 0, 0, 0, W1]

    assert orientation_from_matrix(rot(0)) == Orientation(False, 0)
    assert orientation_from_matrix(rot(90)) == Orientation(False, 1)
    assert orientation_from_matrix(rot(-90)) == Orientation(False, 3)
    assert orientation_from_matrix(rot(180)) == Orientation(False, 2)
    assert orientation_from_matrix(rot(100)) == Orientation(False, 1)  # rounded to the nearest 90
    assert orientation_from_matrix(rot(-150)) == Orientation(False, 2)
    assert orientation_from_matrix(MATRICES["hflip"]) == Orientation(True, 0)
    assert orientation_from_matrix(MATRICES["vflip"]) == Orientation(True, 2)
    assert orientation_from_matrix([0] * 9) == Orientation()  # degenerate: ignored
    img = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    out = Orientation(True, 1).apply(img)
    assert out.flags.c_contiguous and np.array_equal(out, np.rot90(img[:, ::-1]))


# --- raw frames: pixel-exact, and the same direction as ffmpeg's autorotate ------------------------


@needs_ffmpeg
@pytest.mark.parametrize("how", list(EXPECTED))
def test_raw_frames_are_turned_and_flipped_like_ffmpeg_autorotate(plain, tmp_path, how):
    clip = with_display(plain, tmp_path / "shown.mp4", how)
    coded = decode_frames(plain, range(6))
    shown = decode_frames(clip, range(6))
    want = np.stack([EXPECTED[how](f) for f in coded])
    assert shown.shape == want.shape and shown.flags.c_contiguous
    assert np.array_equal(shown, want)
    ref = ffmpeg_view(clip, shown.shape[2], shown.shape[1])
    assert ref.shape == shown.shape
    assert np.abs(ref.astype(np.int16) - shown).mean() < 2.0  # the wrong orientation is ~50 off
    assert np.array_equal(decode_frames(clip, range(6), autorotate=False), coded)  # the opt-out: coded frames


@needs_ffmpeg
def test_pyav_reports_the_matrix_on_every_frame(plain, tmp_path):
    """Facts the parser relies on (PyAV 18): DISPLAYMATRIX side data on each frame; ``frame.rotation``
    is FFmpeg's counter-clockwise angle and cannot tell a horizontal flip from a half turn."""
    seen = {}
    for how in ("rotate=90", "rotate=270", "hflip"):
        with av.open(str(with_display(plain, tmp_path / f"{how}.mp4", how))) as c:
            frames = list(c.decode(video=0))
        assert len({frame_orientation(f) for f in frames}) == 1 and len(frames) == 6
        seen[how] = (frames[0].rotation, frame_orientation(frames[0]))
    assert seen == {"rotate=90": (90, Orientation(False, 1)), "rotate=270": (-90, Orientation(False, 3)),
                    "hflip": (-180, Orientation(True, 0))}


# --- model input: rotation before resize and crop -----------------------------------------------


@needs_ffmpeg
@pytest.mark.parametrize("how", ["rotate=90", "rotate=180", "rotate=270", "hflip", "rot90_vflip"])
def test_decode_clip_turns_before_resizing_and_cropping(tmp_path, how):
    square = encode(tmp_path / "square.mp4", (64, 64))  # square: the centre crop is the whole frame
    clip = with_display(square, tmp_path / "shown.mp4", how)
    cfg = SamplingConfig(num_frames=4, input_size=32)
    coded = decode_clip(square, cfg)
    shown = decode_clip(clip, cfg)
    want = torch.from_numpy(np.ascontiguousarray(
        np.stack([[EXPECTED[how](f.permute(1, 2, 0).numpy()) for f in v] for v in coded]))).permute(0, 1, 4, 2, 3)
    assert shown.shape == coded.shape and torch.equal(shown, want)
    assert torch.equal(decode_clip(clip, cfg.replace(autorotate=False)), coded)


@needs_ffmpeg
def test_short_side_is_the_displayed_short_side(plain, tmp_path):
    clip = with_display(plain, tmp_path / "r90.mp4", "rotate=90")
    limits = VideoLimits()
    with av.open(str(clip)) as c:
        frame = next(c.decode(video=0))
    out = FrameConverter(limits, 32)(frame)
    assert out.shape == (43, 32, 3)  # shown 48 x 64 (W x H): short side 32, long side 64 * 32 / 48
    assert FrameConverter(limits, 32, autorotate=False)(frame).shape == (32, 43, 3)
    with av.open(str(plain)) as c:
        coded = FrameConverter(limits, 32)(next(c.decode(video=0)))
    assert np.array_equal(out, np.rot90(coded))  # resized in coded orientation, then turned


# --- sample aspect ratio ------------------------------------------------------------------------


@needs_ffmpeg
def test_anamorphic_clip_is_shown_twice_as_wide(tmp_path):
    src = make_clip(tmp_path / "coded.mp4", num_frames=4, size=(64, 48))
    wide = tmp_path / "sar2.mp4"
    ffmpeg("-i", str(src), "-c", "copy", "-bsf:v", "h264_metadata=sample_aspect_ratio=2/1", str(wide))
    with av.open(str(wide)) as c:
        assert c.streams.video[0].sample_aspect_ratio == Fraction(2)
    frames = decode_frames(wide, [0, 3])
    assert frames.shape == (2, 48, 128, 3)
    assert decode_frames(wide, [0], autorotate=False).shape == (1, 48, 64, 3)
    ref = ffmpeg_view(wide, 64, 48)  # ffmpeg keeps the SAR as metadata: its pixels are the coded ones
    coded = decode_frames(src, [0, 3])
    assert ref.shape == (4, 48, 64, 3)
    # stretched by 2 along x: every other column is close to the coded picture's
    assert np.abs(frames[:, :, ::2].astype(np.int16) - coded).mean() < 12
    views = decode_clip(wide, SamplingConfig(num_frames=2, input_size=32, spatial_views=3))
    assert views.shape == (3, 2, 3, 32, 32)
    with av.open(str(wide)) as c:
        frame = next(c.decode(video=0))
    assert FrameConverter(VideoLimits(), 32, sample_aspect=Fraction(2))(frame).shape == (32, 85, 3)  # 128 x 48 shown

    both = with_display(wide, tmp_path / "sar2_r90.mp4", "rotate=90")
    assert decode_frames(both, [0]).shape == (1, 128, 48, 3)  # stretched, then turned


@needs_ffmpeg
def test_aspect_limit_applies_to_the_displayed_size(tmp_path):
    from stadapter.video import VideoError

    src = make_clip(tmp_path / "coded.mp4", num_frames=2, size=(64, 48))
    wide = tmp_path / "sar4.mp4"
    ffmpeg("-i", str(src), "-c", "copy", "-bsf:v", "h264_metadata=sample_aspect_ratio=4/1", str(wide))
    limits = VideoLimits(max_aspect_ratio=3.0)
    assert decode_frames(src, [0], limits).shape == (1, 48, 64, 3)
    with pytest.raises(VideoError, match="aspect ratio"):
        decode_frames(wide, [0], limits)  # shown 256 x 48
    assert decode_frames(wide, [0], limits, autorotate=False).shape == (1, 48, 64, 3)


# --- the config field -----------------------------------------------------------------------------


def test_autorotate_field_round_trips_and_old_task_json_loads():
    assert SamplingConfig().autorotate is True
    assert SamplingConfig.from_dict({"num_frames": 4}).autorotate is True  # an old task.json
    off = SamplingConfig(autorotate=False)
    assert off.to_dict()["autorotate"] is False and SamplingConfig.from_dict(off.to_dict()) == off
    with pytest.raises(ConfigError, match="autorotate"):
        SamplingConfig(autorotate="yes")
    import json

    spec = TaskSpec.from_dict(json.loads((REPO / "model_repository/tasks/motion/1/task.json").read_text()))
    assert "autorotate" not in json.loads((REPO / "model_repository/tasks/motion/1/task.json").read_text())["sampling"]
    assert spec.sampling.autorotate is True


# --- the demo motion task sees what a viewer sees ----------------------------------------------


@pytest.fixture(scope="module")
def motion_classifier():
    if not (REPO / "model_repository/trunk").is_dir():
        pytest.skip("no committed demo model_repository")
    from stadapter.api import load_classifier

    return load_classifier(REPO / "model_repository/trunk", REPO / "model_repository/tasks/motion/1")


@needs_ffmpeg
@pytest.mark.parametrize("coded, how, shown", [
    ("right", "rotate=90", "up"),     # turned counter-clockwise: rightwards motion shows as upwards
    ("right", "rotate=270", "down"),
    ("up", "rotate=180", "down"),
    ("left", "hflip", "right"),
])
def test_motion_task_answers_the_direction_a_viewer_sees(motion_classifier, tmp_path, coded, how, shown):
    from training.synthetic import MOTION_LABELS, clip_rng, draw_motion, encode_mp4

    clf = motion_classifier
    src = tmp_path / "coded.mp4"
    encode_mp4(draw_motion(clip_rng(7, "val", 0), MOTION_LABELS.index(coded), 64, 16), src)
    clip = with_display(src, tmp_path / "shown.mp4", how)
    sampling = clf.spec.sampling

    def answer(path: Path, cfg: SamplingConfig) -> str:
        with torch.no_grad():
            return clf.labels[int(clf.predict_views(decode_clip(path, cfg)).argmax())]

    assert answer(src, sampling) == coded
    assert answer(clip, sampling) == shown
    assert answer(clip, sampling.replace(autorotate=False)) == coded


@needs_ffmpeg
def test_training_frames_are_what_serving_shows(tmp_path):
    """Training reads raw frames through decode_sampled_frames: turned and stretched as decode_frames shows them."""
    from stadapter.video import decode_sampled_frames
    from training.frames import read_all

    src = make_clip(tmp_path / "coded.mp4", num_frames=4, size=(64, 48))
    wide = tmp_path / "sar2.mp4"
    ffmpeg("-i", str(src), "-c", "copy", "-bsf:v", "h264_metadata=sample_aspect_ratio=2/1", str(wide))
    both = with_display(wide, tmp_path / "sar2_r90.mp4", "rotate=90")
    served = decode_frames(both, [0, 1, 2, 3])
    assert served.shape == (4, 128, 48, 3)
    assert np.array_equal(decode_sampled_frames(both, lambda n: [0, 2]), served[[0, 2]])
    assert np.array_equal(read_all(both), served)
    assert read_all(both, autorotate=False).shape == (4, 48, 64, 3)
