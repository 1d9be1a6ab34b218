"""Seeded fuzzing through a real server: mutated clips never give INTERNAL/UNKNOWN, never kill or bloat it.

2,000 mutants of a few small clips (byte flips, truncation, MP4 atom corruption, splices) go over
gRPC to one server on 127.0.0.1, four at a time. Afterwards the server is alive, its RSS grew by a
bounded amount, and a good clip still gets the answer the library gives.

Hostile clips made on purpose go the same way: frame sizes that jump mid-stream (64x64, then 8000x8000) in
several containers, and MP4 tables that make FFmpeg answer ENOMEM at once. Each is INVALID_ARGUMENT (never
RESOURCE_EXHAUSTED: a corrupt clip is not worth a retry), costs the decoders little memory, and so do their
mutants.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import media
import pytest
from serverproc import ServerProcess, make_repository

from stadapter import load_classifier
from stadapter.predict import predict_clip
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

MUTANTS = 2000
SEED = 20261202
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}


def _seeds() -> list[bytes]:
    return [
        media.make_clip(None, 24, container="mp4", gop=8),
        media.make_clip(None, 24, container="mp4", gop=12, bframes=2),
        media.make_clip(None, 24, container="matroska", gop=6),
        media.make_clip(None, 24, container="mpegts", gop=10),
        media.make_clip(None, 16, container="webm", codec="libvpx-vp9", gop=8),
        media.make_clip(None, 16, container="mp4", codec="libx265", gop=8),  # HEVC: its NAL units are read too
    ]


def _atoms(data: bytes) -> list[int]:
    """Offsets of the size fields of MP4 boxes found by their four-letter type."""
    out = []
    for kind in (b"ftyp", b"moov", b"mvhd", b"trak", b"mdia", b"stbl", b"stsd", b"stts", b"stss", b"stsz",
                 b"stco", b"ctts", b"mdat", b"avcC", b"elst"):
        i = data.find(kind)
        while i >= 4:
            out.append(i - 4)
            i = data.find(kind, i + 1)
    return out


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    kind = rng.randrange(4)
    if kind == 0:  # byte flips
        for _ in range(rng.randrange(1, 32)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # truncation
        data = data[: rng.randrange(1, len(data))]
    elif kind == 2:  # MP4 atom corruption: sizes and table entries
        atoms = _atoms(bytes(data))
        for _ in range(rng.randrange(1, 4)):
            if not atoms:
                break
            at = rng.choice(atoms)
            value = rng.choice([0, 1, 7, 0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(1 << 32)])
            target = at if rng.random() < 0.5 else min(len(data) - 4, at + 8 + 4 * rng.randrange(8))
            data[target : target + 4] = struct.pack(">I", value)
    else:  # splice two clips, or repeat a slice of one
        other = rng.choice(seeds)
        a, b = rng.randrange(len(data)), rng.randrange(len(other))
        data = data[:a] + other[b:] if rng.random() < 0.7 else data[:a] + data[a // 2 :]
    return bytes(data)


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field}")


def _decoder_peaks_kib(server_pid: int) -> dict[int, int]:
    """Peak RSS (VmHWM) of each process under the server that decodes a clip, by pid: every child but the live
    streams' fork server, which decodes none (it forks a decoder per live stream) and may still be importing its
    modules when the first peaks are read (its own start then counted as growth: 18-26 MiB under load)."""
    with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    peaks = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"multiprocessing.forkserver" in f.read():
                    continue
            peaks[pid] = _rss_kib(pid, "VmHWM")
        except OSError:  # exited meanwhile
            pass
    return peaks


def _commands(pids) -> dict[int, str]:
    """What each process runs (for a failure's message: which of the server's children grew)."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")[-60:]
        except OSError:
            out[pid] = "(exited)"
    return out


def _ffmpeg(*args: str) -> bytes:
    return subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True,
                          stdout=subprocess.PIPE).stdout


def _size_jumps() -> list[bytes]:
    """64x64 for 0.2 s, five frames of 8000x8000 (a solid colour: a few hundred KB), 64x64 again, in three
    containers: any sampling of the clip takes a big frame."""
    if shutil.which("ffmpeg") is None:
        return []
    enc = ("-c:v", "libx264", "-preset", "ultrafast", "-g", "10", "-bf", "0", "-f", "h264", "-")
    small = _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=0.2", *enc)
    raw = small + _ffmpeg("-f", "lavfi", "-i", "color=c=red:size=8000x8000:rate=25:duration=0.2", *enc) + small
    out = []
    for fmt in ("matroska", "flv", "mpegts"):
        out.append(subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-r", "25", "-f", "h264", "-i", "-",
                                   "-c", "copy", "-f", fmt, "-"], input=raw, check=True, stdout=subprocess.PIPE).stdout)
    return out


def _absurd_tables(seed: bytes) -> list[bytes]:
    """MP4s on which FFmpeg answers ENOMEM at once: a 4 GiB time-to-sample table, 1 GiB samples."""
    out = []
    for atom, value in ((b"stts", 0x1FFFFFF0), (b"stsz", 0x3FFFFFF0)):
        data = bytearray(seed)
        at = data.index(atom) + 8
        data[at:at + 4] = struct.pack(">I", value)
        out.append(bytes(data))
    return out


@pytest.mark.timeout(300)
def test_fuzzed_clips_through_a_real_server(tmp_path):
    repo = make_repository(tmp_path / "repo")
    seeds = _seeds()
    rng = random.Random(SEED)
    mutants = [mutate(rng, seeds) for _ in range(MUTANTS)]
    good = seeds[0]
    want = predict_clip(load_classifier(repo / "trunk", repo / "tasks" / "alpha" / "1"), good, 3)
    with ServerProcess(repo, fork=False) as srv:
        channel = grpc.insecure_channel(srv.address)
        stub = pb_grpc.VideoClassifierStub(channel)

        def call(clip: bytes) -> grpc.StatusCode:
            try:
                stub.Classify(pb.ClassifyRequest(task="alpha", clip=clip, top_k=3), timeout=30)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                if e.code() not in ALLOWED:
                    return (e.code(), e.details())
                return e.code()

        for _ in range(3):  # warm the allocator before measuring
            call(good)
        rss0 = _rss_kib(srv.proc.pid)
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(call, mutants))
        elapsed = time.monotonic() - t0
        bad = [(i, c) for i, c in enumerate(codes) if c not in ALLOWED]
        assert not bad, f"{len(bad)} mutants got codes outside {ALLOWED}: {bad[:5]}"
        assert srv.proc.poll() is None, "the server died"
        grew_mib = (_rss_kib(srv.proc.pid) - rss0) / 1024
        assert grew_mib < 300, f"server RSS grew by {grew_mib:.0f} MiB over {MUTANTS} mutants"
        resp = stub.Classify(pb.ClassifyRequest(task="alpha", clip=good, top_k=3), timeout=30)
        assert [p.label for p in resp.predictions] == [w["label"] for w in want]
        ok = sum(c == grpc.StatusCode.OK for c in codes)
        print(f"fuzz: {MUTANTS} mutants in {elapsed:.1f} s, {ok} classified, RSS +{grew_mib:.0f} MiB")
        channel.close()


HOSTILE_MUTANTS = 300


@pytest.mark.timeout(300)
def test_hostile_sizes_and_enomem_headers_through_a_real_server(tmp_path):
    """Size jumps are refused naming the size, ENOMEM headers as corrupt (INVALID_ARGUMENT, not RESOURCE_EXHAUSTED
    "out of memory", which clients retry); the decoders' peak RSS stays within 50 MiB of what good clips cost
    them, for these clips and their mutants; a good clip is answered after."""
    repo = make_repository(tmp_path / "repo")
    good = media.make_clip(None, 24, container="mp4", gop=8)
    jumps, absurd = _size_jumps(), _absurd_tables(good)
    rng = random.Random(SEED + 1)
    mutants = [mutate(rng, jumps + absurd) for _ in range(HOSTILE_MUTANTS)]
    with ServerProcess(repo) as srv:
        channel = grpc.insecure_channel(srv.address)
        stub = pb_grpc.VideoClassifierStub(channel)

        def call(clip: bytes) -> tuple[grpc.StatusCode, str]:
            try:
                stub.Classify(pb.ClassifyRequest(task="alpha", clip=clip, top_k=3), timeout=30)
                return grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                return e.code(), e.details()

        for _ in range(4):  # every decoder has decoded a good clip
            assert call(good)[0] == grpc.StatusCode.OK
        peaks0 = _decoder_peaks_kib(srv.proc.pid)
        for clip in jumps:
            code, details = call(clip)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "8000x8000" in details and "over the limit" in details, \
                (code, details)
        for clip in absurd:
            code, details = call(clip)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "it is corrupt" in details, (code, details)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(call, mutants))
        bad = [(i, r) for i, r in enumerate(results) if r[0] not in ALLOWED or "out of memory" in r[1]]
        assert not bad, f"{len(bad)} hostile mutants answered outside {ALLOWED} or as out of memory: {bad[:5]}"
        assert srv.proc.poll() is None, "the server died"
        peaks = _decoder_peaks_kib(srv.proc.pid)
        base = max(peaks0.values())
        grew = {pid: (kib - peaks0.get(pid, base)) / 1024 for pid, kib in peaks.items()}
        assert max(grew.values()) < 50, f"decoder peak RSS grew by {grew} MiB ({_commands(grew)})"
        assert call(good)[0] == grpc.StatusCode.OK
        channel.close()
