"""What the scan read from each stored version, kept while the files it came from are unchanged.

The registry's scan reads three small things per version folder (``task.json``, the weights file's header, the
recorded digest: :func:`server.registry.loading.read_metadata`). With thousands of tasks those reads are most of a
start and of every poll, and they are the same reads each time: a stored version is immutable (written whole and
renamed into place). :class:`ScanIndex` keeps what was read, with each file's stamp (inode, size, mtime and ctime in
nanoseconds), in memory and in ``<repo>/.scan-index.json`` (one file beside ``tasks/``, shared by the replicas of a
repository), so a later scan (the next poll, the next start) stats the files instead of reading them.

* An entry is used only while every stamp matches what ``stat`` says now: a file rewritten, replaced, truncated,
  removed or added (a digest recorded later) misses and is read again. ctime cannot be set by a user: even a copy
  that keeps the old mtime and size changes it. What is read is stamped with the ``fstat`` of each file as it was
  read (taken before its bytes), so a folder with no entry yet (a first scan) is read without being stat'ed first.
* A file changed within :data:`RACY_NS` of the stat is read but not kept (two writes within one tick of the file
  system's clock could otherwise leave the same stamp on other bytes), so a stamp is only trusted once it has aged.
* The index file is a cache: anything wrong with it (missing, truncated, another format, an entry that no longer
  parses) is a miss, never an error; it is written whole and renamed into place (``atomic_write_text``). A
  repository that cannot be written (read-only) logs that once and keeps the index in memory.
  It holds metadata only: weights are read and checked in full on first use, whatever the index says.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from server.registry.folders import DIGEST_FILE
from stadapter.bundle import ADAPTER_FILE, TASK_FILE
from stadapter.config import AdapterConfig, ConfigError, SamplingConfig, TaskSpec
from stadapter.fsutil import atomic_write_text

log = logging.getLogger("server.registry.scan_index")

INDEX_FILE = ".scan-index.json"  # in the repository's root, beside trunk/ and tasks/ (tasks/ holds only tasks)
INDEX_FORMAT = 1
STAMPED_FILES = (TASK_FILE, ADAPTER_FILE, DIGEST_FILE)
DIGEST_AT = STAMPED_FILES.index(DIGEST_FILE)  # the digest file's place in a Stamp
RACY_NS = 2_000_000_000  # a stamp younger than this is not trusted (see the module docstring)

FileStamp = Optional[tuple[int, int, int, int]]  # (inode, size, mtime_ns, ctime_ns); None: the file is absent
Stamp = tuple[FileStamp, ...]  # one per STAMPED_FILES


@dataclass(frozen=True)
class Metadata:
    """One version's metadata as stored: its spec, its tensors' bytes, the digest recorded at register (None:
    stored without one)."""

    spec: TaskSpec
    nbytes: int
    digest: Optional[str]


Reader = Callable[[Path], tuple[Metadata, Optional[Stamp]]]  # a folder's metadata and its files' stamps as read
                                                             # (None: not all known, nothing is kept)


def file_stamp(path: str) -> FileStamp:
    """One file's stamp; None when it is absent (any other failure to stat it raises ``OSError``)."""
    try:
        return stat_stamp(os.stat(path))
    except FileNotFoundError:
        return None


def stat_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """The stamp of a file from its ``stat`` (or the ``fstat`` of the open file that was read)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamp(folder: Path) -> Optional[Stamp]:
    """The stamps of a version folder's files; None when one cannot be stat'ed (nothing is then kept)."""
    base = os.fspath(folder)
    try:
        return tuple(file_stamp(os.path.join(base, name)) for name in STAMPED_FILES)
    except OSError:
        return None


class ScanIndex:
    """Version metadata by folder (``<task>/<version>``), trusted while its files' stamps hold (module docstring).

    Args:
        file: the index file (``<repo>/.scan-index.json``).
        racy_ns: how old a file's last change must be for its stamp to be trusted (None: :data:`RACY_NS`).
    """

    def __init__(self, file: Path, racy_ns: Optional[int] = None):
        self.file = file
        self._warned = False
        self.racy_ns = RACY_NS if racy_ns is None else racy_ns
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Stamp, Any]] = {}  # key -> (stamp, Metadata or its JSON form, parsed on use)
        self._loaded = False
        self._dirty = False

    def metadata(self, folder: Path, read: Reader) -> Metadata:
        """``folder``'s metadata: the kept entry while its stamp holds (its files stat'ed), else ``read(folder)``,
        kept with the stamps of the files as they were read unless racy (a first scan stats nothing: no entry)."""
        key = _key(folder)
        with self._lock:
            self._load()
            kept = self._entries.get(key)
        if kept is not None:
            now = stamp(folder)
            if now is not None and kept[0] == now:
                meta = kept[1] if isinstance(kept[1], Metadata) else _parsed(*kept[1])
                if meta is not None:
                    with self._lock:
                        self._entries[key] = (now, meta)
                    return meta
        meta, now = read(folder)
        with self._lock:
            if now is not None and not self._racy(now):
                self._entries[key] = (now, meta)
                self._dirty = True
            elif self._entries.pop(key, None) is not None:
                self._dirty = True
        return meta

    def recorded_digest(self, folder: Path, read: Reader) -> Optional[str]:
        """The digest recorded in ``folder``: the kept one while the digest file's stamp holds (one stat: a poll asks
        this of every served version), else from :meth:`metadata`."""
        with self._lock:
            self._load()
            kept = self._entries.get(_key(folder))
        if kept is not None and isinstance(kept[1], Metadata):
            try:
                now: FileStamp = file_stamp(os.path.join(os.fspath(folder), DIGEST_FILE))
            except OSError:
                now = ()  # type: ignore[assignment]  # unknown: never equal to a kept stamp
            if now == kept[0][DIGEST_AT]:
                return kept[1].digest
        return self.metadata(folder, read).digest

    def retain(self, folders: Iterable[Path]) -> None:
        """Forget every entry but ``folders``' (versions gone from disk or no longer the latest)."""
        keep = {_key(f) for f in folders}
        with self._lock:
            gone = [k for k in self._entries if k not in keep]
            for k in gone:
                del self._entries[k]
            self._dirty = self._dirty or bool(gone)

    def save(self) -> None:
        """Write the index file if anything changed since it was read or written (a failure is logged, not raised)."""
        with self._lock:
            if not self._dirty:
                return
            configs: dict[Any, int] = {}  # each distinct adapter and sampling config written once
            kept = {k: (s, m if isinstance(m, Metadata) else _parsed(*m)) for k, (s, m) in self._entries.items()}
            entries = {k: {"stamp": list(s), **_as_json(m, configs)} for k, (s, m) in kept.items() if m is not None}
            self._dirty = False
        try:
            atomic_write_text(self.file, json.dumps({"format": INDEX_FORMAT, "configs": [c.to_dict() for c in configs],
                                                     "entries": entries}, separators=(",", ":")))
        except OSError as e:
            (log.debug if self._warned else log.warning)("cannot write the scan index %s: %s", self.file, e)
            self._warned = True

    def _load(self) -> None:  # under the lock
        if self._loaded:
            return
        self._loaded = True
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
            if data.get("format") != INDEX_FORMAT:
                return
            configs = list(data["configs"])
            for key, e in data["entries"].items():
                self._entries[key] = (tuple(tuple(f) if f is not None else None for f in e["stamp"]), (e, configs))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring the scan index %s: %s", self.file, e)
            self._entries.clear()

    def _racy(self, s: Stamp) -> bool:
        newest = max((f[3] for f in s if f is not None), default=0)
        return time.time_ns() - newest < self.racy_ns


def _key(folder: Path) -> str:
    return "/".join(os.fspath(folder).rsplit(os.sep, 2)[-2:])


def _as_json(m: Metadata, configs: dict[Any, int]) -> dict:
    """An entry as written: the spec with its adapter and sampling configs as indices into ``configs``."""
    spec = m.spec.to_dict()
    spec["adapter"] = configs.setdefault(m.spec.adapter, len(configs))
    spec["sampling"] = configs.setdefault(m.spec.sampling, len(configs))
    return {"spec": spec, "nbytes": m.nbytes, "digest": m.digest}


def _parsed(e: dict, configs: list) -> Optional[Metadata]:
    """An entry read from the index file (its configs parsed once per file), or None if it does not parse (a miss)."""
    try:
        nbytes, digest, spec = e["nbytes"], e["digest"], dict(e["spec"])
        if not isinstance(nbytes, int) or not (digest is None or isinstance(digest, str)):
            return None
        for part, cls in (("adapter", AdapterConfig), ("sampling", SamplingConfig)):
            ref = spec[part]
            if not isinstance(configs[ref], (AdapterConfig, SamplingConfig)):
                configs[ref] = cls.from_dict(configs[ref])
            if not isinstance(configs[ref], cls):
                return None
            spec[part] = configs[ref]
        spec["labels"] = tuple(spec["labels"])
        return Metadata(TaskSpec(**spec), nbytes, digest)
    except (ConfigError, KeyError, TypeError, ValueError, IndexError):
        return None
