"""The cost of a read, predicted from one demux pass: a stream with B-frames is refused before it is decoded.

A decoder that drops the non-reference frames it does not need decodes fewer frames than the keyframe distance
says, so the prediction skipped every H.264/HEVC stream with B-frames: a single-GOP 4096x2304 clip with B-frames
decoded 228 frames (2 s of CPU, +183 MiB) before ``max_decoded_pixels`` refused it. The slices' headers say which
frames are references; those on the way to each sampled frame and shown before it are a lower bound of the frames
the decoder outputs (what the budget counts).
"""

from __future__ import annotations

import pytest
from media import make_clip

from stadapter.config import SamplingConfig
from stadapter.video import VideoError, VideoLimits, decode_clip
from stadapter.video import limits as video_limits
from stadapter.video.decode_plan import StreamScan, decoded_at_least, frames_to_decode

CFG = SamplingConfig(num_frames=8, input_size=32)


def test_the_lower_bound_follows_decode_order_not_presentation_order():
    # presentation I0 b1 B2 b3 P4 | b5 B6 b7 P8; decode order I0 P4 B2 b1 b3 P8 B6 b5 b7 (B2, B6: referenced B-frames)
    order = [0, 4, 2, 1, 3, 8, 6, 5, 7]
    refs = [True, True, True, False, False, True, True, False, False]
    scan = StreamScan(keyframes=[0], order=order, references=refs)
    assert decoded_at_least([4], scan) == 2  # I0 P4: B2 is shown before P4 but decoded after it
    assert decoded_at_least([1], scan) == 2  # I0 P4 B2 b1 decoded; P4 and B2, shown later, may stay in the decoder
    assert decoded_at_least([3], scan) == 3  # I0 P4 B2 b3 decoded (b1 dropped): I0 B2 b3 out by the time b3 is
    assert decoded_at_least([1, 3], scan) == 4  # I0 b1 B2 b3
    assert decoded_at_least([7], scan) == 5  # I0 B2 P4 B6 b7: P8, decoded before b7, is shown after it
    assert decoded_at_least([9], scan) is None  # a frame the scan did not see
    assert decoded_at_least([1], StreamScan(keyframes=[0])) is None  # no reference flags
    assert frames_to_decode([4], [0]) == 5  # the bound without B-frames: every frame from the keyframe


@pytest.mark.parametrize("codec,gop,frames", [("libx264", 120, 120), ("libx264", 30, 90), ("libx265", 60, 60)])
def test_the_prediction_never_exceeds_what_the_decoder_decodes(monkeypatch, budget_calls, codec, gop, frames):
    """A lower bound: a clip the decoder can read within the budget is never refused by the prediction."""
    clip = make_clip(None, frames, gop=gop, bframes=3, codec=codec)
    decoded = budget_calls("frame")
    predicted = []
    real_predicted = video_limits.Budget.check_predicted

    def recording(self, n, w, h):
        predicted.append(n)
        real_predicted(self, n, w, h)

    monkeypatch.setattr(video_limits.Budget, "check_predicted", recording)
    tight = VideoLimits(max_decoded_pixels=64 * 48 * (frames // 4))  # decoding to the end could pass: predicted
    for cfg in (CFG, SamplingConfig(num_frames=3, input_size=32), SamplingConfig(num_frames=8, temporal_views=2,
                                                                                   input_size=32)):
        predicted.clear()
        with pytest.raises(VideoError, match="max_decoded_pixels"):
            decode_clip(clip, cfg, tight)
        assert predicted, "the prediction was not made"
        decoded.clear()
        decode_clip(clip, cfg)  # no limit near: what the decoder really decodes for this read
        assert predicted[0] <= len(decoded), (cfg, predicted, len(decoded))


def test_a_single_gop_with_b_frames_over_the_pixel_budget_is_refused_before_it_is_decoded(budget_calls):
    clip = make_clip(None, 120, gop=120, bframes=3)
    decoded = budget_calls("frame")
    with pytest.raises(VideoError, match="max_decoded_pixels"):
        decode_clip(clip, CFG, VideoLimits(max_decoded_pixels=64 * 48 * 20))
    assert decoded == [], f"{len(decoded)} frames decoded before the refusal"
    assert decode_clip(clip, CFG, VideoLimits(max_decoded_pixels=64 * 48 * 120)).shape == (1, 8, 3, 32, 32)
