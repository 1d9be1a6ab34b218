"""Seeded fuzzing through a real server: mutated clips never give INTERNAL/UNKNOWN, never kill or bloat it.

2,000 mutants of a few small clips (byte flips, truncation, MP4 atom corruption, splices) go over
gRPC to one server on 127.0.0.1, four at a time. Afterwards the server is alive, its RSS grew by a
bounded amount, and a good clip still gets the answer the library gives.
"""

from __future__ import annotations

import random
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

import media
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


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(300)
def test_fuzzed_clips_through_a_real_server(tmp_path):
    repo = make_repository(tmp_path / "repo")
    seeds = _seeds()
    rng = random.Random(SEED)
    mutants = [mutate(rng, seeds) for _ in range(MUTANTS)]
    good = seeds[0]
    want = predict_clip(load_classifier(repo / "trunk", repo / "tasks" / "alpha" / "1"), good, 3)
    with ServerProcess(repo) as srv:
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
