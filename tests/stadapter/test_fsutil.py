"""stadapter.fsutil's file helpers: the bytes land whole under the target name, fsynced, or not at all."""

from __future__ import annotations

import os

import pytest

from stadapter import fsutil


@pytest.fixture()
def fsynced(monkeypatch) -> list[str]:
    """Paths (or folders) passed to os.fsync during the test."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(fsutil.os, "fsync", spy)
    return seen


def test_atomic_write_replaces_the_file_and_fsyncs_it_and_its_folder(tmp_path, fsynced):
    target = tmp_path / "sub" / "a.json"
    fsutil.atomic_write_text(target, "one\n")
    fsutil.atomic_write_bytes(target, b"two\n")
    assert target.read_bytes() == b"two\n"
    assert os.listdir(tmp_path / "sub") == ["a.json"]  # no temp file left behind
    files = [p for p in fsynced if os.path.basename(p).startswith(".tmp-a.json-")]
    assert len(files) == 2 and fsynced.count(str(tmp_path / "sub")) == 2  # the data before the rename, the folder after


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with fsutil.atomic_file(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_exclusive_lock_excludes_another_holder_until_released(tmp_path):
    import fcntl

    path = tmp_path / "lock"

    def try_lock() -> bool:
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with fsutil.exclusive_lock(path):
        assert not try_lock()
    assert try_lock()


def test_read_regular_file_reads_a_file_whole_and_neither_blocks_on_nor_reads_anything_else(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    data, st = fsutil.read_regular_file(f)
    assert data == b"x" * 100 and st.st_size == 100
    assert fsutil.read_regular_file(f, limit=100)[0] == b"x" * 100
    assert fsutil.read_regular_file(f, limit=99) == (None, os.stat(f))  # over the limit by its fstat: not read
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open would wait for ever
    data, st = fsutil.read_regular_file(tmp_path / "fifo")
    assert data is None and not os.path.isfile(tmp_path / "fifo")
    with pytest.raises(FileNotFoundError):
        fsutil.read_regular_file(tmp_path / "absent")

    real = os.fstat  # a file that grew after its fstat: read on to the limit + 1, or to its end

    def shrunk(fd: int) -> os.stat_result:
        fields = list(real(fd))
        fields[6] = 10  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(fsutil.os, "fstat", shrunk)
    assert fsutil.read_regular_file(f, limit=50)[0] == b"x" * 51
    assert fsutil.read_regular_file(f)[0] == b"x" * 100
