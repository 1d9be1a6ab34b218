"""What the NAL unit headers of H.264 and HEVC packets tell before the decoder sees them: sizes and references.

A sequence parameter set (SPS) may arrive in any packet, so the size of a stream can jump mid-way. FFmpeg's
``max_pixels`` refuses the new size only when the frame buffer is allocated, after the H.264/HEVC decoder has
already allocated its per-macroblock tables for it (tens of MB for 16000x16000). So the packets of these codecs
are looked through first: every SPS NAL unit they carry (length-prefixed as in MP4/Matroska/FLV, or behind
start codes as in MPEG-TS and raw streams) gives its coded size, checked against the limit before the packet is
decoded. Only the few fields before the size are parsed; an SPS that cannot be parsed is left to the decoder.

The header of a packet's first slice also says whether the frame is a reference (H.264 ``nal_ref_idc``, HEVC's
``_N`` unit types): a decoder told to drop unneeded non-reference frames (``skip_frame=NONREF``) decodes all
others, which bounds from below what reaching a sampled frame costs (:mod:`.decode_plan`).
"""

from __future__ import annotations

from typing import Iterator, Optional

H264_SPS, HEVC_SPS = 7, 33  # NAL unit types
_H264_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})  # chroma info follows
_MAX_EXP_GOLOMB_ZEROS = 31  # a longer prefix is no valid exp-Golomb code in a parameter set


class _Truncated(Exception):
    """The bits ended, or a field is out of range: the SPS is left to the decoder."""


class _Bits:
    def __init__(self, rbsp: bytes) -> None:
        self.data, self.pos = rbsp, 0

    def u(self, n: int) -> int:
        v = 0
        for _ in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise _Truncated
            v = (v << 1) | ((self.data[byte] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > _MAX_EXP_GOLOMB_ZEROS:
                raise _Truncated
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def _rbsp(payload: bytes) -> bytes:
    """The NAL payload without its emulation-prevention bytes (00 00 03 -> 00 00)."""
    return payload.replace(b"\x00\x00\x03", b"\x00\x00") if b"\x00\x00\x03" in payload else payload


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt:
            nxt = (last + bits.se() + 256) % 256
        last = nxt or last


def h264_sps_size(nal: bytes) -> Optional[tuple[int, int]]:
    """Coded width and height of an H.264 SPS NAL unit (header byte included); None if it cannot be parsed."""
    try:
        bits = _Bits(_rbsp(nal[1:]))
        profile = bits.u(8)
        bits.u(16)  # constraint flags, level
        bits.ue()  # seq_parameter_set_id
        frame_mbs_only = 1
        if profile in _H264_HIGH_PROFILES:
            chroma = bits.ue()
            if chroma == 3:
                bits.u(1)  # separate_colour_plane_flag
            bits.ue()
            bits.ue()  # bit depths
            bits.u(1)  # qpprime_y_zero_transform_bypass_flag
            if bits.u(1):  # seq_scaling_matrix_present_flag
                for i in range(12 if chroma == 3 else 8):
                    if bits.u(1):
                        _skip_scaling_list(bits, 16 if i < 6 else 64)
        bits.ue()  # log2_max_frame_num_minus4
        poc_type = bits.ue()
        if poc_type == 0:
            bits.ue()
        elif poc_type == 1:
            bits.u(1)
            bits.se()
            bits.se()
            cycle = bits.ue()
            if cycle > 255:
                raise _Truncated
            for _ in range(cycle):
                bits.se()
        bits.ue()  # max_num_ref_frames
        bits.u(1)  # gaps_in_frame_num_value_allowed_flag
        width_mbs, height_units = bits.ue() + 1, bits.ue() + 1
        frame_mbs_only = bits.u(1)
    except _Truncated:
        return None
    return width_mbs * 16, height_units * 16 * (2 - frame_mbs_only)


def hevc_sps_size(nal: bytes) -> Optional[tuple[int, int]]:
    """Coded width and height of an HEVC SPS NAL unit (2-byte header included); None if it cannot be parsed."""
    try:
        bits = _Bits(_rbsp(nal[2:]))
        bits.u(4)  # sps_video_parameter_set_id
        sub_layers = bits.u(3)  # sps_max_sub_layers_minus1
        bits.u(1)
        bits.u(96)  # general profile, tier and level
        present = [(bits.u(1), bits.u(1)) for _ in range(sub_layers)]
        if sub_layers:
            bits.u(2 * (8 - sub_layers))  # reserved_zero_2bits
        for profile, level in present:
            bits.u(88 * profile + 8 * level)
        bits.ue()  # sps_seq_parameter_set_id
        if bits.ue() == 3:  # chroma_format_idc
            bits.u(1)
        return bits.ue(), bits.ue()
    except _Truncated:
        return None


def _length_prefixed(data: memoryview, size: int) -> Iterator[tuple[int, int]]:
    pos = 0
    while pos + size <= len(data):
        n = int.from_bytes(data[pos:pos + size], "big")
        pos += size
        if n == 0 or pos + n > len(data):
            return
        yield pos, pos + n
        pos += n


def _start_coded(data: bytes) -> Iterator[tuple[int, int]]:
    pos = data.find(b"\x00\x00\x01")
    while pos >= 0:
        start = pos + 3
        pos = data.find(b"\x00\x00\x01", start)
        yield start, pos if pos >= 0 else len(data)


class NalScan:
    """The NAL units of one stream's packets, for ``h264`` and ``hevc`` (:data:`CHECKED_CODECS`).

    ``extradata``: the stream's codec configuration: an avcC/hvcC record says packets are length-prefixed
    (and with how many bytes); otherwise they carry start codes."""

    def __init__(self, codec: str, extradata: Optional[bytes]) -> None:
        self.hevc = codec == "hevc"
        self.sps_type = HEVC_SPS if self.hevc else H264_SPS
        ext = extradata or b""
        self.length_size: Optional[int] = None
        if ext[:1] == b"\x01":  # a configuration record, not start codes
            at = 21 if self.hevc else 4
            if len(ext) > at:
                self.length_size = (ext[at] & 3) + 1

    def _units(self, packet) -> tuple[memoryview | bytes, Iterator[tuple[int, int]]]:
        if self.length_size:
            data = memoryview(packet)
            return data, _length_prefixed(data, self.length_size)
        whole = bytes(packet)
        return whole, _start_coded(whole)

    def _kind(self, first: int) -> int:
        return (first >> 1) & 0x3F if self.hevc else first & 0x1F

    def sps_sizes(self, packet) -> Iterator[tuple[int, int]]:
        """The sizes the SPS units in ``packet`` (any buffer) announce."""
        data, units = self._units(packet)
        for start, end in units:
            if start < end and self._kind(data[start]) == self.sps_type:
                nal = bytes(data[start:end])
                size = hevc_sps_size(nal) if self.hevc else h264_sps_size(nal)
                if size is not None:
                    yield size

    def is_reference(self, packet) -> Optional[bool]:
        """Whether the frame in ``packet`` may be referenced by others (its first slice's header says); None when
        the packet holds no slice."""
        data, units = self._units(packet)
        for start, end in units:
            if start == end:
                continue
            kind = self._kind(data[start])
            if self.hevc and kind < 32:  # VCL units: the even types up to 14 are sub-layer non-reference
                return not (kind <= 14 and kind % 2 == 0)
            if not self.hevc and 1 <= kind <= 5:
                return (data[start] >> 5) & 3 != 0
        return None


CHECKED_CODECS = frozenset({"h264", "hevc"})
