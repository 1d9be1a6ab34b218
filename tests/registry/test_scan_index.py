"""The scan's index (server.registry.scan_index): a start or poll over unchanged folders stats files instead of
reading them, and a file that changed, went bad or is too fresh to trust is read again, never served from the index."""

from __future__ import annotations

import asyncio
import builtins
import io
import json
import os
import shutil
import threading
import time

import pytest
from factories import make_bundle

from server.app import Server
from server.config import ServerConfig
from server.errors import BrokenTask
from server.registry import scan_index
from server.registry.folders import DIGEST_FILE, bundle_digest
from server.registry.registry import TaskRegistry
from server.registry.scan_index import INDEX_FILE
from stadapter.bundle import ADAPTER_FILE, TASK_FILE


@pytest.fixture()
def trusted(monkeypatch):
    """Stamps trusted at once (the files of a test are seconds old; the racy-stamp rule has its own test)."""
    monkeypatch.setattr(scan_index, "RACY_NS", 0)


def past_a_clock_tick() -> None:
    """Let the file system's clock move on (its timestamps are coarser than ns): with the racy-stamp rule off, a file
    rewritten within the tick of the stamp the index kept could otherwise keep that stamp."""
    time.sleep(0.05)


def reads_under(monkeypatch, root) -> list[str]:
    """Every file under ``root`` opened from now on (builtins.open and io.open: what pathlib and open() use;
    os.open: what read_spec uses)."""
    opened: list[str] = []

    def counting(real):
        def opening(file, *args, **kwargs):
            if str(root) in os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else False:
                opened.append(os.fsdecode(file))
            return real(file, *args, **kwargs)
        return opening

    monkeypatch.setattr(io, "open", counting(io.open))
    monkeypatch.setattr(builtins, "open", counting(builtins.open))
    monkeypatch.setattr(os, "open", counting(os.open))
    return opened


def served(reg: TaskRegistry) -> dict:
    return {n: (tv.spec, tv.nbytes, tv.digest, tv.path) for n, tv in reg.tasks.items()}


def test_a_start_and_a_poll_over_unchanged_folders_read_no_task_file(two_task_repo, tiny_trunk, trusted, monkeypatch):
    first = TaskRegistry(two_task_repo, tiny_trunk)
    first.sync()
    assert (two_task_repo / INDEX_FILE).is_file()
    opened = reads_under(monkeypatch, two_task_repo / "tasks")
    second = TaskRegistry(two_task_repo, tiny_trunk)  # a restart, or another replica
    second.sync()
    second.sync()  # a poll
    assert opened == []
    assert served(second) == served(first)


def test_a_first_scan_stamps_each_file_as_it_reads_it_without_a_stat_first(two_task_repo, tiny_trunk, trusted,
                                                                             monkeypatch):
    """With no index entry a version's stamps come from the ``fstat`` of each file as it is read, so a first scan of
    thousands of folders stats none of their files (it used to stat all three, then open and read them); the test
    above checks that what it kept then serves the next start."""
    for folder in (two_task_repo / "tasks").glob("*/1"):
        (folder / DIGEST_FILE).write_text(bundle_digest(folder))
    stamped = {TASK_FILE, ADAPTER_FILE, DIGEST_FILE}
    statted: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if str(two_task_repo) in os.fsdecode(path) and os.path.basename(os.fsdecode(path)) in stamped:
            statted.append(os.fsdecode(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    assert sorted(reg.tasks) == ["alpha", "beta"] and statted == []


def test_a_file_changed_in_place_is_read_again(two_task_repo, tiny_trunk, trusted):
    TaskRegistry(two_task_repo, tiny_trunk).sync()
    task_file = two_task_repo / "tasks" / "alpha" / "1" / TASK_FILE
    before = task_file.read_text()
    after = before.replace("alpha-class-0", "alpha-class-X")  # the same size on disk, in the same inode
    assert after != before and len(after) == len(before)
    past_a_clock_tick()
    task_file.write_text(after)
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    assert reg.tasks["alpha"].spec.labels[0] == "alpha-class-X"


def test_a_corrupted_or_replaced_file_is_never_served_from_the_index(two_task_repo, tiny_trunk, tiny_trunk_dir, trusted):
    TaskRegistry(two_task_repo, tiny_trunk).sync()
    past_a_clock_tick()
    (two_task_repo / "tasks" / "alpha" / "1" / TASK_FILE).write_text("{ not json")
    beta = two_task_repo / "tasks" / "beta" / "1"
    make_bundle(tiny_trunk, two_task_repo / "other", name="beta", labels=["p", "q"], seed=9)
    shutil.copy(two_task_repo / "other" / TASK_FILE, beta / TASK_FILE)  # a copy over it: another spec
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    assert "alpha" not in reg.tasks and "not valid JSON" in reg._failed[("alpha", 1)]
    assert reg.tasks["beta"].spec.labels == ("p", "q")


def test_a_digest_recorded_by_another_replica_is_seen_by_a_poll(two_task_repo, tiny_trunk, trusted):
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    first = reg.tasks["alpha"]
    assert first.digest == ""
    alpha = two_task_repo / "tasks" / "alpha" / "1"
    (alpha / DIGEST_FILE).write_text(bundle_digest(alpha))  # the folder's content, now recorded
    published, retired = reg.sync()
    assert [tv.digest for tv in published] == [bundle_digest(alpha)] and retired == [first]
    past_a_clock_tick()
    (alpha / DIGEST_FILE).write_text("0" * 64)  # the same number, other content (as a replica would record it)
    published, _ = reg.sync()
    assert [tv.digest for tv in published] == ["0" * 64]


def test_a_task_added_by_another_replica_is_seen_by_a_poll(two_task_repo, tiny_trunk, trusted):
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    make_bundle(tiny_trunk, two_task_repo / "tasks" / "gamma" / "1", name="gamma", seed=3)
    shutil.rmtree(two_task_repo / "tasks" / "beta")
    published, retired = reg.sync()
    assert [tv.name for tv in published] == ["gamma"] and [tv.name for tv in retired] == ["beta"]
    assert sorted(json.loads((two_task_repo / INDEX_FILE).read_text())["entries"]) == ["alpha/1", "gamma/1"]


def test_fresh_files_are_read_again_until_their_stamps_age(two_task_repo, tiny_trunk, monkeypatch):
    TaskRegistry(two_task_repo, tiny_trunk).sync()  # the default rule: files changed seconds ago are not kept
    opened = reads_under(monkeypatch, two_task_repo / "tasks")
    TaskRegistry(two_task_repo, tiny_trunk).sync()
    assert {os.path.basename(p) for p in opened} >= {TASK_FILE, ADAPTER_FILE}


@pytest.mark.parametrize("content", [b"", b"\x00garbage", b"[]", b'{"format": 1, "configs": [], "entries": {"alpha/1": 7}}',
                                     b'{"format": 1, "configs": [{"width": "x"}], "entries": {"alpha/1": {"stamp": '
                                     b'[null, null, null], "spec": {"adapter": 0, "sampling": 0}, "nbytes": 1, '
                                     b'"digest": null}}}'])
def test_a_bad_index_file_is_ignored(two_task_repo, tiny_trunk, trusted, content):
    good = TaskRegistry(two_task_repo, tiny_trunk)
    good.sync()
    (two_task_repo / INDEX_FILE).write_bytes(content)
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    assert served(reg) == served(good)
    assert json.loads((two_task_repo / INDEX_FILE).read_text())["format"] == scan_index.INDEX_FORMAT  # written anew


def test_an_index_entry_whose_stamps_match_but_whose_spec_is_bad_is_read_again(two_task_repo, tiny_trunk, trusted):
    good = TaskRegistry(two_task_repo, tiny_trunk)
    good.sync()
    data = json.loads((two_task_repo / INDEX_FILE).read_text())
    data["entries"]["alpha/1"]["spec"]["labels"] = []  # not a spec: a miss, the files are read
    (two_task_repo / INDEX_FILE).write_text(json.dumps(data))
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    assert served(reg) == served(good)


def test_a_repository_that_cannot_take_the_index_still_serves(two_task_repo, tiny_trunk, trusted):
    (two_task_repo / INDEX_FILE).mkdir()  # the rename over it fails
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    assert sorted(reg.tasks) == ["alpha", "beta"]
    assert [p.name for p in two_task_repo.iterdir() if p.name.startswith(".tmp-")] == []  # no temporary left


@pytest.mark.parametrize("change", ["renamed", "corrupted"])
def test_a_task_file_changed_between_the_scan_and_the_first_use_fails_the_load(two_task_repo, tiny_trunk, trusted,
                                                                               change):
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    tv = reg.tasks["alpha"]
    task_file = two_task_repo / "tasks" / "alpha" / "1" / TASK_FILE
    past_a_clock_tick()
    if change == "renamed":
        task_file.write_text(task_file.read_text().replace('"alpha"', '"alpha2"'))
    else:
        task_file.write_text("{ not json")
    with pytest.raises(BrokenTask, match="now says 'alpha2'" if change == "renamed" else "not valid JSON"):
        reg.host.load_now(tv)
    assert reg.host.load_now(reg.tasks["beta"]) is not None  # the other task still loads


def test_the_first_use_reads_the_weights_but_not_the_task_file_again(two_task_repo, tiny_trunk, trusted, monkeypatch):
    alpha = two_task_repo / "tasks" / "alpha" / "1"
    (alpha / DIGEST_FILE).write_text(bundle_digest(alpha))  # as a register records it (else the load hashes the files)
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    opened = reads_under(monkeypatch, two_task_repo / "tasks")
    reg.host.load_now(reg.tasks["alpha"])
    assert TASK_FILE not in {os.path.basename(p) for p in opened}


def test_a_version_folder_named_with_a_leading_zero_is_served_from_that_folder(two_task_repo, tiny_trunk):
    alpha = two_task_repo / "tasks" / "alpha"
    (alpha / "1").rename(alpha / "01")  # int("01") == 1: served from the folder as it is named
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    reg.sync()
    assert reg.tasks["alpha"].path == alpha / "01" and reg.scan()["alpha"] == (1, alpha / "01")
    assert reg.host.load_now(reg.tasks["alpha"]) is not None


def test_the_scan_counts_a_bundles_tensor_bytes_from_its_header_length(tmp_path, tiny_trunk):
    """The bytes after a safetensors header are its tensors' (the format leaves no gap), in any dtype and with the
    header padded; a file whose header's length cannot be read, or claims more than the file, counts its size."""
    import struct

    import torch
    from safetensors.torch import load_file, save_file

    from server.registry.loading import tensor_bytes_and_stat

    bundle = make_bundle(tiny_trunk, tmp_path / "alpha" / "1", name="alpha", seed=1)
    tensors = load_file(str(bundle / ADAPTER_FILE))
    for dtype in (torch.float32, torch.bfloat16):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(path))
        assert tensor_bytes_and_stat(path)[0] == sum(t.numel() * t.element_size() for t in load_file(str(path)).values())
    odd = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(3, dtype=torch.uint8)}, str(odd))  # a header padded to 8 bytes, 3 bytes of data
    assert tensor_bytes_and_stat(odd)[0] == 3
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    assert tensor_bytes_and_stat(short)[0] == 2
    claims = tmp_path / "claims.safetensors"
    claims.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    assert tensor_bytes_and_stat(claims)[0] == 10
    assert tensor_bytes_and_stat(tmp_path / "missing.safetensors")[0] == 0


def test_a_servers_start_does_not_wait_for_the_index_write(two_task_repo, trusted, monkeypatch):
    """The first scan's index (a whole file of thousands of entries at a first start) is written by a thread once
    the server serves: here the write is held until ``Server.start`` has returned, then lets the file be written."""
    returned = threading.Event()
    waited: list[bool] = []
    real_save = scan_index.ScanIndex.save

    def held_save(self):
        waited.append(returned.wait(timeout=5))  # False: the write ran inside the start, which was still waiting
        real_save(self)

    monkeypatch.setattr(scan_index.ScanIndex, "save", held_save)
    cfg = ServerConfig(model_repository=str(two_task_repo), host="127.0.0.1", port=0, metrics_port=0, http_port=-1,
                       decode_backend="thread", warmup=False, poll_interval_s=0)

    async def start_then_drain() -> None:
        srv = await Server.start(cfg)
        returned.set()
        await srv.drain()  # lets the write finish

    asyncio.run(start_then_drain())
    assert waited == [True]
    assert set(json.loads((two_task_repo / INDEX_FILE).read_text())["entries"]) == {"alpha/1", "beta/1"}


@pytest.mark.parametrize("fname, loads", [(ADAPTER_FILE, False), (DIGEST_FILE, True)], ids=["weights", "digest"])
def test_a_fifo_in_place_of_a_bundle_file_neither_blocks_the_scan_nor_is_read(two_task_repo, tiny_trunk, fname, loads):
    """The scan opened a version's weights file and its digest file with a blocking open: a FIFO in place of either
    (a named pipe left in the repository) held the scan, and with it a server's start or every later poll, until
    something wrote to it. Now the scan goes on and serves the other task; the folder with the FIFO is served as
    stored without a digest (its digest computed from its files on first use) or, without its weights, fails its
    first use with BrokenTask."""
    fifo = two_task_repo / "tasks" / "beta" / "1" / fname
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    reg = TaskRegistry(two_task_repo, tiny_trunk)
    done = threading.Event()
    scan = threading.Thread(target=lambda: (reg.sync(), done.set()), daemon=True)
    scan.start()
    try:
        assert done.wait(timeout=10), f"the scan is blocked opening the FIFO {fname}"
    finally:
        if not done.is_set():  # unblock the open (a writer comes and goes), so no thread is left behind
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            scan.join(timeout=10)
    assert sorted(reg.tasks) == ["alpha", "beta"]
    beta = reg.tasks["beta"]
    if loads:
        assert beta.host_stack is not None and beta.digest == bundle_digest(beta.path)
    else:
        with pytest.raises(BrokenTask, match="adapter.safetensors"):
            assert beta.host_stack is None  # not reached: the load raises
