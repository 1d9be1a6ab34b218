"""``--host-dtype serving`` over real servers: a bfloat16 server keeps its host copies in bfloat16 (half the host bytes
of ``--host-dtype stored`` for the float32 bundles) and answers the same clips with the same scores within
bfloat16's tolerance, the same top-1; a float32 server is unchanged by it (same bytes, same scores)."""

from __future__ import annotations

import grpc
import media
import pytest
from serverproc import ServerProcess, make_repository, metric, scrape

from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

TASKS = ("alpha", "beta")
BF16_ATOL = 2e-2  # scores are probabilities: bf16's 8-bit mantissa, through a softmax


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repository(tmp_path_factory.mktemp("host-dtype") / "repo")


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    return [media.make_clip(num_frames=n, start_pts=s) for n, s in ((12, 0), (20, 3), (30, 7))]


def served(repo, clips: list[bytes], *flags: str) -> tuple[float, dict[tuple[str, int], list[tuple[str, float]]]]:
    """The host bytes after every task's first request, and each (task, clip)'s full ranking."""
    with ServerProcess(repo, "--device", "cpu", "--no-warmup", "--poll-interval-s", "0", *flags) as srv:
        clf = pb_grpc.VideoClassifierStub(grpc.insecure_channel(srv.address))
        answers = {}
        for task in TASKS:
            for i, clip in enumerate(clips):
                r = clf.Classify(pb.ClassifyRequest(task=task, clip=clip, top_k=100), timeout=120)
                answers[(task, i)] = [(p.label, p.score) for p in r.predictions]
        return metric(scrape(srv.metrics_url), "stadapter_host_bytes"), answers


def test_a_bf16_server_keeps_host_copies_in_bf16_half_the_bytes_and_the_same_answers(repo, clips):
    stored_bytes, stored = served(repo, clips, "--dtype", "bfloat16")
    kept_bytes, kept = served(repo, clips, "--dtype", "bfloat16", "--host-dtype", "serving")
    assert stored_bytes > 0 and kept_bytes == stored_bytes / 2
    for key, ranking in stored.items():
        assert kept[key][0][0] == ranking[0][0], key  # the same top-1
        got, want = dict(kept[key]), dict(ranking)
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) <= BF16_ATOL for k in want), (key, got, want)


def test_a_float32_server_is_unchanged_by_host_dtype_serving(repo, clips):
    stored_bytes, stored = served(repo, clips)
    kept_bytes, kept = served(repo, clips, "--host-dtype", "serving")
    assert kept_bytes == stored_bytes > 0
    assert kept == stored
