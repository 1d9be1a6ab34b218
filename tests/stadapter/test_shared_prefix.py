"""A shared trunk prefix: rows of one clip for several tasks run the unadapted blocks once.

The library part on a 4-block tiny trunk (fp32): ``VideoTrunk.forward(..., row_input=...)``
gives every row the logits of running its clip alone with its task, runs the blocks below
the lowest adapted one once per distinct input (counted at the attention modules), and is
today's path when a task adapts block 0. The server part: :class:`server.engine.model.ModelRunner`
shares an input between clips that hand in the same views tensor (identity, not content),
and over a real server a several-task request equals one-task requests and offline
predictions while ``stadapter_shared_prefix_rows_total`` counts the rows that reused a prefix.
"""

from __future__ import annotations

import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import media
import pytest
import torch
from factories import TINY_SAMPLING, make_bundle, make_task_adapters, make_trunk_dir
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess

from server.engine.model import ModelRunner
from server.engine.slots import AdapterSlots
from server.registry.registry import TaskVersion
from stadapter import AdapterConfig, AdapterStack, TaskSpec, VideoTrunk, load_classifier, load_trunk
from stadapter.bank import SlotBank, TaskShape
from stadapter.factory import arch_record, build_visual
from stadapter.predict import predict_clip
from stadapter_api.v1 import inference_pb2 as pb
from stadapter_api.v1 import inference_pb2_grpc as pb_grpc

CPU = torch.device("cpu")
T = 4
DEEP = {  # name -> (adapter config, classes); on 4 blocks: adapted from block 2, 3, 2 and 0
    "last2": (AdapterConfig(width=8, pre_attn=True, pre_mlp=True, layers=2), 3),
    "last1": (AdapterConfig(width=6, kernel=(3, 3, 3), pre_attn=False, pre_mlp=True, layers=1), 5),
    "last2_attn": (AdapterConfig(width=4, pre_attn=True, pre_mlp=False, layers=2), 4),
    "full": (AdapterConfig(width=8, pre_attn=True, pre_mlp=True), 3),
}


@pytest.fixture(scope="module")
def trunk4() -> VideoTrunk:
    """The tiny trunk's shape with 4 blocks (random, seeded), so that depths 1 and 2 differ from full depth."""
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 16,
                                           "patch_size": 8, "mlp_ratio": 2.0}}
    torch.manual_seed(0)
    return VideoTrunk(build_visual(cfg, False), arch_record(cfg, False))


def _stacks(trunk: VideoTrunk, names) -> list[AdapterStack]:
    out = []
    for i, name in enumerate(names):
        cfg, n = DEEP[name]
        s = make_task_adapters(trunk, n, cfg, seed=20 + i).stack()
        out.append(AdapterStack({k: w.map(lambda t: t.detach().clone()) for k, w in s.slots.items()},
                                s.head_w.detach().clone(), s.head_b.detach().clone(), s.num_classes, s.activation))
    return out


def _bank(trunk: VideoTrunk, stacks: list[AdapterStack]) -> SlotBank:
    bank = SlotBank(trunk.dim, CPU, torch.float32)
    bank.reserve(len(stacks), also_fit=[TaskShape.of(s) for s in stacks])
    for slot, s in enumerate(stacks):
        bank.write(slot, s)
    return bank


@contextmanager
def attention_batches(trunk: VideoTrunk):
    """Per block, the batch sizes (frames) its attention saw during the block."""
    seen: list[list[int]] = [[] for _ in trunk.blocks]
    hooks = [blk.attn.register_forward_pre_hook(lambda m, args, kw, i=i: seen[i].append(int(args[0].shape[0])),
                                                with_kwargs=True)
             for i, blk in enumerate(trunk.blocks)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _rows(n_inputs: int, tasks: int, views: list[int]) -> tuple[list[int], list[int]]:
    """Every (input, task) pair as rows, tasks interleaved: (row -> input row, row -> task)."""
    offset = [sum(views[:u]) for u in range(n_inputs)]
    row_input, row_task = [], []
    for u in range(n_inputs):
        for k in range(tasks):
            for j in range(views[u]):
                row_input.append(offset[u] + j)
                row_task.append(k)
    return row_input, row_task


# --- the library ------------------------------------------------------------------------------------


def test_rows_sharing_an_input_equal_each_row_alone_and_the_prefix_runs_once(trunk4):
    names = ["last2", "last1", "last2_attn"]  # depths 2, 1, 2: the prefix is blocks 0 and 1
    stacks = _stacks(trunk4, names)
    bank = _bank(trunk4, stacks)
    views = [2, 1]  # input 0 has 2 views, input 1 one
    frames = torch.randn(sum(views), T, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    row_input, row_task = _rows(len(views), len(names), views)
    stack, task_index = bank.stacked(list(range(len(names)))), torch.tensor(row_task)
    assert trunk4.prefix_blocks(stack) == 2
    with torch.no_grad(), attention_batches(trunk4) as seen:
        logits = trunk4(frames, stack, task_index, torch.tensor(row_input))
    n_rows = len(row_input)
    assert logits.shape[0] == n_rows == 9
    assert seen == [[3 * T], [3 * T], [n_rows * T], [n_rows * T]]  # blocks 0-1 once per input row, 2-3 per row
    with torch.no_grad():
        for r, (u, k) in enumerate(zip(row_input, row_task, strict=True)):
            alone = trunk4(frames[u:u + 1], stacks[k])[0]
            n = stacks[k].num_classes[0]
            torch.testing.assert_close(logits[r, :n], alone, atol=1e-5, rtol=0)
            assert torch.all(logits[r, n:] == 0)


def test_one_task_view_and_the_plain_model_fan_out_too(trunk4):
    (stack,) = _stacks(trunk4, ["last1"])
    frames = torch.randn(2, T, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    idx = torch.tensor([1, 0, 1])
    with torch.no_grad():
        assert trunk4.prefix_blocks(stack) == 3 and trunk4.prefix_blocks(None) == 4
        torch.testing.assert_close(trunk4(frames, stack, None, idx), trunk4(frames[idx], stack), atol=1e-5, rtol=0)
        with attention_batches(trunk4) as seen:
            feats = trunk4.forward_features(frames, None, None, idx)  # no adapter: every block once per input
        assert seen == [[2 * T]] * 4
        torch.testing.assert_close(feats, trunk4.forward_features(frames[idx]), atol=1e-5, rtol=0)


def test_a_task_adapting_block_0_makes_the_split_0(trunk4):
    stacks = _stacks(trunk4, ["last1", "full"])
    bank = _bank(trunk4, stacks)
    mixed = bank.stacked([0, 1])
    assert trunk4.prefix_blocks(mixed) == 0 and trunk4.prefix_blocks(bank.stacked([0])) == 3
    frames = torch.randn(1, T, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), attention_batches(trunk4) as seen:
        shared = trunk4(frames, mixed, torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert seen == [[2 * T]] * 4  # every block per row
    with torch.no_grad():
        torch.testing.assert_close(shared, trunk4(frames.expand(2, -1, -1, -1, -1), mixed, torch.tensor([0, 1])),
                                   atol=1e-5, rtol=0)


def test_stacked_keeps_only_the_keys_of_the_tasks_used(trunk4):
    stacks = _stacks(trunk4, ["last1", "full"])
    bank = _bank(trunk4, stacks)
    assert set(bank.stacked([0]).slots) == {(3, "pre_mlp")}
    assert set(bank.stacked().slots) == set(stacks[1].slots) | set(stacks[0].slots)
    frames = torch.randn(2, T, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # the keys dropped hold zeros for these rows: the logits do not move
        torch.testing.assert_close(trunk4(frames, bank.stacked([0]), torch.tensor([0, 0])),
                                   trunk4(frames, bank.stacked(), torch.tensor([0, 0])), atol=1e-6, rtol=0)
    bank.clear(1)
    with pytest.raises(ValueError, match=r"slots \[1\] are empty"):
        bank.stacked([0, 1])


def test_bad_row_index_is_refused_with_a_clear_error(trunk4):
    stacks = _stacks(trunk4, ["last2", "last1"])
    bank = _bank(trunk4, stacks)
    frames = torch.zeros(2, T, 3, 32, 32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="row_input must be a 1-D long tensor"):
            trunk4(frames, bank.view(0), None, torch.tensor([0.0, 1.0]))
        with pytest.raises(ValueError, match="row_input must be a 1-D long tensor"):
            trunk4(frames, bank.view(0), None, torch.tensor([[0, 1]]))
        with pytest.raises(ValueError, match=r"task_index \(2,\) must have one entry per row \(3\)"):
            trunk4(frames, bank.stacked(), torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
        with pytest.raises(IndexError):
            trunk4(frames, bank.view(0), None, torch.tensor([0, 2]))
        assert trunk4(frames, bank.view(0), None, torch.tensor([1, 0])).shape == (2, 3)  # still fine after


# --- the server's batch assembly --------------------------------------------------------------------


def _versions(trunk: VideoTrunk, tmp_path: Path, names) -> list[TaskVersion]:
    out = []
    for name, stack in zip(names, _stacks(trunk, names), strict=True):
        cfg, n = DEEP[name]
        spec = TaskSpec(name=name, labels=tuple(f"c{j}" for j in range(n)), adapter=cfg, sampling=TINY_SAMPLING,
                        trunk_fingerprint=trunk.fingerprint)
        out.append(TaskVersion(spec, stack, tmp_path / name, stack.nbytes))
    return out


def _alone(trunk, tv, views):
    with torch.no_grad():
        return trunk(views, tv.host_stack).softmax(-1).mean(0)


def test_runner_shares_the_prefix_of_clips_handed_in_as_one_tensor(trunk4, tmp_path):
    tvs = _versions(trunk4, tmp_path, ["last2", "last1", "last2_attn"])
    g = torch.Generator().manual_seed(7)
    shared, other = torch.randn(2, T, 3, 32, 32, generator=g), torch.randn(1, T, 3, 32, 32, generator=g)
    clips = [(tvs[0], shared), (tvs[1], other), (tvs[1], shared), (tvs[2], shared)]
    runner = ModelRunner(trunk4, AdapterSlots(1 << 20, CPU, torch.float32))
    with attention_batches(trunk4) as seen:
        out = runner.forward(clips)
    assert (out.rows, out.shared_rows) == (7, 4)  # 3 clips of 2 views on one input: 4 rows reused its prefix
    assert seen == [[3 * T], [3 * T], [7 * T], [7 * T]]
    for (tv, views), p in zip(clips, out.probs, strict=True):
        torch.testing.assert_close(p, _alone(trunk4, tv, views), atol=1e-5, rtol=0)


def test_runner_matches_by_identity_not_content_and_split_0_is_todays_path(trunk4, tmp_path):
    tvs = _versions(trunk4, tmp_path, ["last2", "last1", "full"])
    views = torch.randn(1, T, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    runner = ModelRunner(trunk4, AdapterSlots(1 << 20, CPU, torch.float32))
    equal_content = runner.forward([(tvs[0], views), (tvs[1], views.clone())])  # two clips that look alike
    assert equal_content.shared_rows == 0
    with attention_batches(trunk4) as seen:
        full = runner.forward([(tvs[0], views), (tvs[2], views), (tvs[1], views)])  # "full" adapts block 0
    assert full.shared_rows == 0 and seen == [[3 * T]] * 4
    apart = runner.forward([(tvs[0], views), (tvs[2], views.clone()), (tvs[1], views.clone())])
    for a, b in zip(full.probs, apart.probs, strict=True):
        assert torch.equal(a, b)  # the very same computation as clips of their own


# --- over a real server -----------------------------------------------------------------------------


HALF = AdapterConfig(width=8, pre_attn=True, pre_mlp=True, layers=1)  # the tiny trunk has 2 blocks


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prefix") / "repo"
    make_trunk_dir(root / "trunk")
    trunk = load_trunk(root / "trunk")
    for i, (name, n) in enumerate((("act", 3), ("scene", 4), ("safety", 2))):
        make_bundle(trunk, root / "tasks" / name / "1", name=name, labels=[f"{name}-{c}" for c in range(n)],
                    cfg=HALF, seed=30 + i)
    make_bundle(trunk, root / "tasks" / "deep" / "1", name="deep", seed=40)  # every block
    return root


@pytest.fixture(scope="module")
def srv(repo):
    with ServerProcess(repo, "--max-queue-delay-ms", "200", "--max-batch-size", "16", "--poll-interval-s", "0") as s:
        s.stub = pb_grpc.VideoClassifierStub(grpc.insecure_channel(s.address))
        yield s


def _shared_rows(srv) -> float:
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "stadapter_shared_prefix_rows_total"), -1.0)


def _scores(result) -> dict[str, float]:
    return {p.label: p.score for p in result.predictions}


@pytest.mark.integration
def test_several_tasks_on_one_clip_share_the_prefix_and_equal_one_task_requests(srv, repo, tmp_path):
    data = media.make_clip(tmp_path / "clip.mp4", num_frames=20).read_bytes()
    tasks = ["act", "scene", "safety"]

    def classify(**kw):
        return srv.stub.Classify(pb.ClassifyRequest(clip=data, top_k=5, **kw), timeout=30)

    n0 = _shared_rows(srv)
    assert n0 == 0  # exposed from the start
    alone = {t: classify(task=t) for t in tasks}
    assert _shared_rows(srv) == n0  # one task per clip: nothing to share
    r = classify(tasks=tasks)
    assert _shared_rows(srv) - n0 == 2  # one clip, one view, 3 task rows: 2 rows reused the first's prefix
    assert [t.task for t in r.results] == tasks
    for t in r.results:
        assert t.timings.batch_size == 3
        got, want = _scores(t), _scores(alone[t.task])
        assert got.keys() == want.keys()
        for label in got:
            assert got[label] == pytest.approx(want[label], abs=1e-5)
        offline = predict_clip(load_classifier(repo / "trunk", repo / "tasks" / t.task / "1"), data, 5)
        assert [p["label"] for p in offline] == [p.label for p in t.predictions]
        for p, q in zip(offline, t.predictions, strict=True):
            assert p["score"] == pytest.approx(q.score, abs=1e-5)
    # a full-depth task in the request: the lowest adapted block is 0, nothing is shared, answers still equal
    n1 = _shared_rows(srv)
    mixed = classify(tasks=["act", "deep"])
    assert _shared_rows(srv) == n1
    for label, score in _scores(mixed.results[0]).items():
        assert score == pytest.approx(_scores(alone["act"])[label], abs=1e-5)
    # an unknown task fails its item only; the two known ones still share the clip's prefix
    bad = classify(tasks=["act", "no-such-task", "safety"])
    assert bad.results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert bad.results[0].predictions and bad.results[2].predictions
    assert _shared_rows(srv) - n1 == 1
    assert classify(tasks=tasks).results[2].predictions  # still serving


@pytest.mark.integration
def test_the_multi_task_bench_runs_and_shares_the_prefix_for_last_half_adapters_only(monkeypatch):
    from bench import multi_task

    monkeypatch.setitem(multi_task.TRUNKS, "tiny", (*multi_task.TRUNKS["tiny"][:3], ("64x48 1 s",)))
    r = multi_task.run(rounds=1)
    rows = {e["depth"]: e for e in r["clips"]}
    assert set(rows) == {"full", "half"} and all(e["speedup"] > 0 for e in rows.values())
    assert (rows["half"]["shared_prefix_rows_one_request"], rows["full"]["shared_prefix_rows_one_request"]) == (3, 0)
    assert rows["half"]["shared_prefix_rows_four_requests"] == 0  # four uploads: four inputs, nothing shared
    assert (rows["half"]["decodes_one_request"], rows["half"]["decodes_four_requests"]) == (1, 4)


# --- blocks in chunks of whole clips (VideoTrunk.chunk_bytes; the server sets it on CPU) ---------------


@contextmanager
def chunked(trunk: VideoTrunk, frames: int):
    """Chunks of ``frames`` frames: trunk4's tokens are 17 x 32 floats a frame."""
    trunk.chunk_bytes = frames * 17 * 32 * 4
    try:
        yield
    finally:
        trunk.chunk_bytes = 0


@pytest.mark.parametrize("form", ["one task", "gather", "shared prefix"])
def test_blocks_in_chunks_of_frames_give_every_row_the_same_logits(trunk4, form):
    names = ["last2", "full", "last1"]
    stacks = _stacks(trunk4, names)
    bank = _bank(trunk4, stacks)
    g = torch.Generator().manual_seed(5)
    frames = torch.randn(5, T, 3, 32, 32, generator=g)  # 5 clips (rows)
    row_input = None
    if form == "one task":
        stack, task_index = stacks[1], None
    elif form == "gather":
        stack, task_index = bank.stacked([0, 1, 2]), torch.tensor([0, 1, 2, 1, 0])
    else:  # 2 inputs, each for tasks last2 and last1: the prefix (blocks 0-1) runs once per input
        stack, task_index = bank.stacked([0, 2]), torch.tensor([0, 2, 0, 2])
        frames, row_input = frames[:2], torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        whole = trunk4(frames, stack, task_index, row_input)
        with chunked(trunk4, 2 * T), attention_batches(trunk4) as seen:  # two clips per block call
            parts = trunk4(frames, stack, task_index, row_input)
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=0)
    if form == "shared prefix":
        assert seen == [[2 * T]] * 2 + [[2 * T, 2 * T]] * 2  # 2 inputs in the prefix; 4 rows after, 2 a call
    else:
        assert seen == [[2 * T, 2 * T, T]] * 4


def test_a_chunk_of_one_tasks_rows_runs_that_task_alone_without_a_gather(trunk4, monkeypatch):
    """On CPU a mixed batch's chunk whose rows are one task's runs on that task's weights (no per-row gather)."""
    import stadapter.adapter as adapter_mod

    stacks = _stacks(trunk4, ["full", "last2"])
    bank = _bank(trunk4, stacks)
    frames = torch.randn(4, T, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    stack, task_index = bank.stacked([0, 1]), torch.tensor([0, 0, 1, 0])  # chunks of 2 rows: [0, 0], [1, 0]
    with torch.no_grad():
        whole = trunk4(frames, stack, task_index)
        gathered: list[int] = []
        real = adapter_mod.torch.baddbmm
        monkeypatch.setattr(adapter_mod.torch, "baddbmm", lambda *a, **k: (gathered.append(a[1].shape[0]), real(*a, **k))[1])
        with chunked(trunk4, 2 * T):
            parts = trunk4(frames, stack, task_index)
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=0)
    # per adapter slot 2 gathered GEMMs (down, up) for the mixed chunk [1, 0] only; the head gathers all 4 rows once
    assert gathered.count(2) == 2 * len(stack.slots) and set(gathered) <= {2, 4}


def test_a_chunk_smaller_than_a_clip_still_takes_whole_clips(trunk4):
    stack = _stacks(trunk4, ["full"])[0]
    frames = torch.randn(3, T, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        whole = trunk4(frames, stack)
        with chunked(trunk4, 1), attention_batches(trunk4) as seen:  # 1 frame: one clip (T frames) a call
            parts = trunk4(frames, stack)
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=0)
    assert seen == [[T, T, T]] * 4


def test_the_server_chunks_blocks_on_cpu_by_its_flag(two_task_repo, tmp_path):
    import asyncio

    from server.app import Server
    from server.config import ServerConfig, parse_args

    assert ServerConfig(model_repository=tmp_path).cpu_chunk_bytes == 5 << 20
    assert parse_args(["--model-repository", str(tmp_path), "--cpu-chunk-bytes", "0"]).cpu_chunk_bytes == 0
    with pytest.raises(ValueError, match="cpu_chunk_bytes must be an int >= 0"):
        ServerConfig(model_repository=tmp_path, cpu_chunk_bytes=-1)

    async def started_with(chunk_bytes: int) -> int:
        cfg = ServerConfig(model_repository=two_task_repo, host="127.0.0.1", port=0, metrics_port=0, http_port=-1,
                           decode_backend="thread", warmup=False, poll_interval_s=0, cpu_chunk_bytes=chunk_bytes)
        srv = await Server.start(cfg)
        try:
            return srv.batcher.runner.trunk.chunk_bytes
        finally:
            await srv.drain()

    assert asyncio.run(started_with(12345)) == 12345


def test_the_default_chunk_leaves_a_small_trunks_batch_whole(trunk4):
    """5 MiB of tokens: 8 ViT-B/16 frames a call, but the tiny trunks' batches (2 KiB a frame) run at once."""
    from server.config import ServerConfig

    stack = _stacks(trunk4, ["full"])[0]
    frames = torch.randn(5, T, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    trunk4.chunk_bytes = ServerConfig.cpu_chunk_bytes
    try:
        with torch.no_grad(), attention_batches(trunk4) as seen:
            trunk4(frames, stack)
    finally:
        trunk4.chunk_bytes = 0
    assert seen == [[5 * T]] * 4
    assert (5 << 20) // (197 * 768 * 4) == 8  # ViT-B/16: 197 tokens of 768 floats a frame
