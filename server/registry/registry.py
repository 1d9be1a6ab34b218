"""The task registry: which version of which task is served, kept in step with the repository folder.

Layout: ``<repo>/tasks/<task>/<version>/`` (a bundle); folders whose names start with ``.`` (temp, tombstones) are ignored.

* Publishing is one reference swap of an immutable ``name -> TaskVersion`` dict, so a request that captured its
  :class:`TaskVersion` at admission runs on it to the end.
* Register: the upload is written to ``tasks/.upload-*`` inside the repository, validated, given version
  ``latest + 1`` (``task.json`` rewritten), fsynced and renamed to ``tasks/<task>/<version>`` (rename into place
  is atomic; a rename onto a version another replica just took fails and the next number is tried).
* Unregister: the task leaves the table at once (new requests get NOT_FOUND), its folder is renamed to
  ``tasks/.deleted-*`` (so neither a restart nor another replica brings it back) and deleted when the last
  in-flight request ends. (A task folder linked to another filesystem: see :func:`move_into_place`.)
* :meth:`TaskRegistry.sync` re-reads the folder: replicas sharing it pick up each other's registers and unregisters
  by polling. It reads metadata only (``task.json``, the digest, the tensor sizes; a folder whose files are unchanged
  since they were read is stat'ed, not read: :mod:`~server.registry.scan_index`); weights come into host memory on
  first use, through the registry's :class:`~server.registry.host_tier.HostTier` (``registry.host``). A version
  whose weights turn out bad then leaves service as a bad folder does at sync: the previous good one is served.
* Every task a caller names (``name`` or ``name@N``) passes :func:`task_ref` first, here at the registry's door, so
  no entry point can forget it: a name that is not a task name is INVALID_ARGUMENT before it reaches a table or path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Collection, Mapping, Optional

from server.errors import BadRequest, BrokenTask, TaskNotFound
from server.registry.folders import (
    DIGEST_FILE,
    LEFTOVER_IDLE_S,
    SWEEP_INTERVAL_S,
    UPLOAD_FILES,
    UPLOAD_ID_FILE,
    bundle_digest,
    last_write,
    latest_versions,
    leftovers,
    move_into_place,
    remove_in_background,
    remove_tree,
    stored_digest,
    task_path,
    task_ref,
    tombstone_dir,
    upload_path,
    version_dirs,
)
from server.registry.host_tier import DEFAULT_HOST_CACHE_BYTES, HostTier
from server.registry.loading import VersionReader, loaded_version, owned_stack
from server.registry.marks import RETIRED_MARKS_KEPT, TaskMarks
from server.registry.version import Seen, TaskVersion, log_published
from stadapter.bank import AdapterStack
from stadapter.bundle import ADAPTER_FILE, TASK_FILE, BundleError, BundleLimits, load_bundle
from stadapter.config import TaskSpec, brief
from stadapter.fsutil import fsync_tree
from stadapter.trunk import VideoTrunk

if TYPE_CHECKING:
    import torch

__all__ = ["TaskRegistry", "TaskVersion"]  # TaskVersion lives in server.registry.version; imported from here too

log = logging.getLogger("server.registry.registry")


class TaskRegistry:
    """Tasks served by one trunk, loaded from and written to ``<repo>/tasks``.

    Args:
        repository: the model repository folder.
        trunk: the loaded trunk (bundles are checked against it).
        limits: bundle size limits.
        keep_versions: versions of a task kept on disk after a register.
        on_change: called with (published, retired) TaskVersions after every change
            (the server updates metrics and drops retired adapters from the device cache).
        host_cache_bytes, pinned_tasks, on_host_event, host_dtype: the host tier's budget, the task names it never
            evicts, its events and the dtype it keeps weights in (:class:`~server.registry.host_tier.HostTier`).
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        trunk: VideoTrunk,
        limits: BundleLimits = BundleLimits(),
        keep_versions: int = 2,
        on_change: Optional[Callable[[list[TaskVersion], list[TaskVersion]], None]] = None,
        host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES,
        pinned_tasks: Collection[str] = (),
        on_host_event: Optional[Callable[[str, float], None]] = None,
        host_dtype: "Optional[torch.dtype]" = None,
    ):
        self.root = Path(repository)
        self.tasks_dir = self.root / "tasks"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        self.marks = TaskMarks(self.tasks_dir)  # the per-name locks and version high-water marks
        self.trunk = trunk
        self.limits = limits
        self.keep_versions = keep_versions
        self.on_change = on_change
        self._table: Mapping[str, TaskVersion] = MappingProxyType({})
        self._pinned: Mapping[tuple[str, int], TaskVersion] = MappingProxyType({})  # older versions requests pinned
        self._write_lock = threading.Lock()  # one structural change at a time in this process
        self._failed: dict[tuple[str, int], str] = {}  # bad folders seen on disk: not retried
        self._next_sweep = 0.0  # monotonic time of the next sweep of leftovers (see sync)
        self.host = HostTier(self._read_weights, host_cache_bytes, pinned_tasks, on_host_event, self._take_out, host_dtype)
        self.reader = VersionReader(self.root, trunk, limits, self.host)  # the scan's reads (metadata, indexed)

    # --- reading -----------------------------------------------------------------------------------

    @property
    def tasks(self) -> Mapping[str, TaskVersion]:
        """The current table (an immutable snapshot)."""
        return self._table

    def get(self, task: str) -> TaskVersion:
        """``name``: the served (newest) version; ``name@N``: version N, while it is servable (a pin)."""
        name, version = task_ref(task)
        tv = self._table.get(name)
        if tv is None:
            known = sorted(self._table)
            broken = sorted(v for n, v in self._failed if n == name)
            why = f" (version {broken[-1]} on disk cannot be served: {self._failed[(name, broken[-1])]})" if broken else ""
            raise TaskNotFound(f"unknown task {brief(name)}{why}; served tasks: {known[:20]}"
                               f"{' …' if len(known) > 20 else ''}")
        return tv if version in (None, tv.version) else self._pinned_version(name, version)

    async def preload(self, task: str) -> None:
        """Load the older version ``task`` pins (``name@N``) on a worker thread if no request has yet, so its first
        request does not read a bundle on the event loop; errors are left to :meth:`get`, called next."""
        try:
            name, version = task_ref(task)
        except BadRequest:
            return
        served = self._table.get(name)
        if version is not None and served is not None and version != served.version and (name, version) not in self._pinned:
            with contextlib.suppress(TaskNotFound, BadRequest):
                await asyncio.to_thread(self.get, task)

    def acquire(self, task: str) -> TaskVersion:
        """Capture a version for one request, as :meth:`get` names it (pair with ``tv.release()``)."""
        tv = self.get(task)
        tv.acquire()
        return tv

    def servable_versions(self, name: str) -> list[int]:
        """The versions of a served task a request may pin, oldest first: the newest ``keep_versions`` stored
        folders up to the served version."""
        tv = self._table.get(name)
        if tv is None:
            return []
        return sorted(v for v in version_dirs(task_path(self.tasks_dir, name)) if v <= tv.version)[-self.keep_versions:]

    def _pinned_version(self, name: str, version: int) -> TaskVersion:
        """An older servable version, loaded on its first pinned request and kept while it stays servable."""
        tv = self._pinned.get((name, version))
        if tv is not None:
            return tv
        servable = self.servable_versions(name)
        if version not in servable:
            raise TaskNotFound(f"task {name} version {version} is not servable; servable versions: {servable}")
        if (name, version) in self._failed:
            raise BrokenTask(f"task {name} version {version} cannot be served: {self._failed[(name, version)]}")
        try:  # outside the write lock: a register holding it (fsync) must not stall this request's loop
            loaded = self.load_version(task_path(self.tasks_dir, name) / str(version))
        except (BundleError, OSError, ValueError) as e:
            raise TaskNotFound(f"task {name} version {version} cannot be loaded: {e}") from e
        with self._write_lock:
            tv = self._pinned.get((name, version))
            if tv is None:  # else another request loaded it meanwhile: that copy is the one
                tv = loaded
                self.host.adopt(tv)
                self._pinned = MappingProxyType({**self._pinned, (name, version): tv})
                log.info("serving pinned task %s version %d (%d adapter bytes)", name, version, tv.nbytes)
        return tv

    def _retire_unservable_pins(self) -> None:
        """Drop pinned versions that left the servable set (pruned, unregistered, or now the served one)."""
        keep, gone = {}, []
        for (name, version), tv in self._pinned.items():
            served = self._table.get(name)
            if served is not None and version < served.version and version in self.servable_versions(name):
                keep[(name, version)] = tv
            else:
                gone.append(tv)
        if gone:
            self._pinned = MappingProxyType(keep)
            self._publish(dict(self._table), [], gone)

    def load_version(self, path: Path) -> TaskVersion:
        """The version in ``path`` with its weights read now (the server's scan reads metadata only)."""
        return loaded_version(path, self.trunk, self.limits, self.host, self.host.dtype)

    def _read_weights(self, tv: TaskVersion) -> AdapterStack:
        return self.reader.read_weights(tv, self.host.dtype)

    async def ensure_loaded(self, tv: TaskVersion) -> None:
        """``tv``'s weights in host memory, read off the event loop on first use (BrokenTask for a bad bundle)."""
        await self.host.ensure(tv)

    def _take_out(self, tv: TaskVersion, error: Exception) -> None:
        """A version whose weights did not load: never retried; its task serves the newest older good version
        stored (as :meth:`sync` does for a bad folder), or leaves the table."""
        self._failed[tv.key] = str(error.__cause__ or error)
        log.error("task %s version %d is taken out of service: %s", tv.name, tv.version, error)
        with self._write_lock:
            if self._table.get(tv.name) is tv:
                table = dict(self._table)
                del table[tv.name]
                published = []
                for v, folder in sorted(version_dirs(task_path(self.tasks_dir, tv.name)).items(), reverse=True):
                    if v >= tv.version or (tv.name, v) in self._failed:
                        continue
                    try:
                        older = self.reader.version_at(folder)
                    except (BundleError, OSError, ValueError) as e:
                        self._failed[(tv.name, v)] = str(e)
                        continue
                    if older.key == (tv.name, v):
                        table[tv.name] = older
                        published = [older]
                        break
                self._publish(table, published, [tv])
            elif tv in self._pinned.values():
                self._pinned = MappingProxyType({k: p for k, p in self._pinned.items() if p is not tv})
                self._publish(dict(self._table), [], [tv])

    # --- syncing with the folder -------------------------------------------------------------------

    def scan(self) -> dict[str, tuple[int, Path]]:
        """Latest version folder per task on disk."""
        return latest_versions(self.tasks_dir)

    def sync(self, save_index: bool = True, seen: Seen = lambda tv: None) -> tuple[list[TaskVersion], list[TaskVersion]]:
        """Make the table match the folder: load new or newer versions, drop tasks gone from disk.

        A folder that fails to load is logged once and skipped (the older version, if any, stays served). Returns
        (published, retired). ``save_index=False``: the caller writes the scan index (``reader.index.save()``) later.
        ``seen``: given each version to publish as soon as it is read (the start's warm-up begins on them).
        """
        if time.monotonic() >= self._next_sweep:  # the poll loop calls sync: leftovers go within minutes
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
            self.cleanup_temp()
        with self._write_lock:
            on_disk = self.scan()
            table = dict(self._table)
            published, retired = [], []
            for name, (version, path) in on_disk.items():
                cur = table.get(name)
                if (name, version) in self._failed or (cur is not None and cur.version == version
                                                       and self.reader.recorded_digest(path) in (None, cur.digest)):
                    continue  # known bad; or the same number and content (stored without a digest: the number alone)
                try:
                    tv = self.reader.version_at(path)
                    if tv.name != name or tv.version != version:
                        raise BundleError(f"{path}: task.json says {tv.name!r} version {tv.version}, "
                                          f"but the folder is {name}/{version}")
                except (BundleError, OSError, ValueError) as e:
                    self._failed[(name, version)] = str(e)
                    log.error("skipping task folder %s: %s", path, e)
                    continue
                table[name] = tv
                published.append(tv)
                seen(tv)
                if cur is not None:
                    retired.append(cur)
            for name in list(table):
                if name not in on_disk:
                    retired.append(table.pop(name))
            if published or retired:
                self._publish(table, published, retired)
            self._retire_unservable_pins()
            self.reader.index.retain(path for _, path in on_disk.values())
        if save_index:
            self.reader.index.save()  # outside the lock: a register need not wait for it
        return published, retired

    def _publish(self, table: dict[str, TaskVersion], published: list[TaskVersion], retired: list[TaskVersion]) -> None:
        self._table = MappingProxyType(table)  # the one atomic swap
        for tv in retired:
            tv.retired = True
            tv.when_idle(functools.partial(self.host.discard, tv))  # its weights leave host memory with its last request
        log_published(log, published)
        if self.on_change is not None:
            self.on_change(published, retired)

    # --- register / unregister -------------------------------------------------------------------

    def upload_path(self) -> Path:
        """A fresh name for an upload folder (not created: the caller creates it inside its cleanup scope)."""
        return upload_path(self.tasks_dir)

    def new_upload_dir(self) -> Path:
        d = self.upload_path()
        d.mkdir()
        return d

    def register_upload(self, upload: Path, upload_id: str = "",
                        claim: Callable[[], bool] = lambda: True) -> TaskVersion:
        """Validate an uploaded bundle folder, store it as the task's next version, publish it.

        ``upload_id`` (the client's, one per register call and reused by its retries) is stored in the
        version folder; an upload whose id a stored version of the task already has is that version
        again: it is returned and nothing is published. The upload folder is consumed (moved or deleted).
        ``claim()`` is asked right before the folder is published: False (the request was cancelled meanwhile)
        publishes nothing and leaves no new task folder.
        """
        new_task_dir: Optional[Path] = None
        try:
            for fname in UPLOAD_FILES:
                if not (upload / fname).is_file():
                    raise BadRequest(f"the upload lacks {fname}: a bundle needs {TASK_FILE} and {ADAPTER_FILE}")
            bundle = load_bundle(upload, self.trunk, self.limits)
            name = bundle.spec.name
            with self._write_lock, self.marks.lock(name):
                task_dir = task_path(self.tasks_dir, name)
                try:
                    task_dir.mkdir()
                    new_task_dir = task_dir
                except FileExistsError:
                    pass
                if upload_id:
                    done = self._published_upload(task_dir, upload, bundle.spec, upload_id)
                    if done is not None:
                        return done
                cur = self._table.get(name)
                version = max([0, cur.version if cur else 0, self.marks.high_water(name), *version_dirs(task_dir)]) + 1
                while True:
                    spec = bundle.spec.replace(version=version)
                    (upload / TASK_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
                    digest = bundle_digest(upload)
                    (upload / DIGEST_FILE).write_text(digest + "\n")
                    if upload_id:  # on disk before the folder is published: a retry after a crash finds it
                        (upload / UPLOAD_ID_FILE).write_text(upload_id + "\n")
                    fsync_tree(upload)
                    if not claim():
                        raise BadRequest("the upload was cancelled before it was published")
                    target = task_dir / str(version)
                    try:
                        move_into_place(upload, target)  # fails if another replica took this version
                        break
                    except OSError:
                        if not target.exists():
                            raise
                        version += 1
                fd = os.open(task_dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.marks.raise_high_water(name, version)
                tv = TaskVersion(spec, owned_stack(bundle, self.trunk.num_blocks, self.host.dtype), target, bundle.nbytes, digest,
                                 source=self.host)  # validated in full above: in host memory from the start
                self.host.adopt(tv)
                table = dict(self._table)
                old = table.get(name)
                table[name] = tv
                self._publish(table, [tv], [old] if old else [])
                self._prune_old_versions(task_dir, keep=self.keep_versions)
                self._retire_unservable_pins()
            return tv
        except BaseException:
            if new_task_dir is not None:  # created for this upload and never filled
                with contextlib.suppress(OSError):
                    new_task_dir.rmdir()
            raise
        finally:
            if upload.exists():
                shutil.rmtree(upload, ignore_errors=True)

    def _published_upload(self, task_dir: Path, upload: Path, spec: TaskSpec, upload_id: str) -> Optional[TaskVersion]:
        """The stored version of this task that ``upload_id`` published, if any (under the write lock).

        The same id with other content is refused: an id names one bundle, not a slot to overwrite."""
        for version, folder in sorted(version_dirs(task_dir).items(), reverse=True):
            try:
                stored_id = (folder / UPLOAD_ID_FILE).read_text().strip()
            except OSError:
                continue
            if stored_id != upload_id:
                continue
            (upload / TASK_FILE).write_text(json.dumps(spec.replace(version=version).to_dict(), indent=2) + "\n")
            if bundle_digest(upload) != stored_digest(folder):
                raise BadRequest(f"upload id {brief(upload_id)} already published {spec.name} version {version} "
                                 "with other content; use a new upload id for each bundle")
            cur = self._table.get(spec.name)
            log.info("upload id %s is %s version %d already: returned, not published again",
                     brief(upload_id), spec.name, version)
            return cur if cur is not None and cur.version == version else self.reader.version_at(folder)
        return None

    def _prune_old_versions(self, task_dir: Path, keep: int) -> None:
        versions = version_dirs(task_dir)
        for v in sorted(versions)[:-keep]:
            dead = tombstone_dir(self.tasks_dir, versions[v], f"{task_dir.name}-{v}")
            if dead is not None:
                remove_tree(dead)

    def unregister(self, task: str) -> tuple[str, int]:
        """Stop serving ``name`` (every version) or ``name@N`` (that version: when it is the served one, the
        newest older servable version is served instead) now; folders go once requests on them end.
        Returns the task's name and the version removed (the served one, for a whole task). A task this
        registry does not serve is NOT_FOUND before any lock is taken or file touched."""
        name, pinned = task_ref(task)
        self.get(name)
        with self._write_lock, self.marks.lock(name):
            served = self.get(name)
            one = pinned is not None
            version = pinned if pinned is not None else served.version
            if one and version not in self.servable_versions(name):
                raise TaskNotFound(f"task {name} version {version} is not servable; "
                                   f"servable versions: {self.servable_versions(name)}")
            owner = served if version == served.version else self._pinned.get((name, version))
            task_dir = task_path(self.tasks_dir, name)
            folder = task_dir / str(version) if one else task_dir
            dead = tombstone_dir(self.tasks_dir, folder, f"{name}-{version}" if one else name)
            if owner is served:  # else a pinned version (or one never pinned): the pins' sweep retires it
                table, published = dict(self._table), []
                del table[name]
                older = version_dirs(task_dir) if one else {}
                if older:
                    published = [self.reader.version_at(older[max(older)])]
                    table[name] = published[0]
                self._publish(table, published, [served])
            self._retire_unservable_pins()
        if dead is not None:  # the last request may end on the event loop: delete in a thread of its own
            if owner is None:
                remove_in_background(dead)
            else:
                owner.when_idle(lambda: remove_in_background(dead))
        return name, version

    def cleanup_temp(self, idle_s: float = LEFTOVER_IDLE_S, marks_kept: int = RETIRED_MARKS_KEPT) -> None:
        """Remove leftovers of interrupted uploads and deletions: entries in which nothing was written for
        ``idle_s`` (an upload in progress keeps writing its files; a replica may be mid-upload); and fold the
        high-water marks of long-gone names beyond ``marks_kept`` (:meth:`TaskMarks.sweep`)."""
        now = time.time()
        for p in leftovers(self.tasks_dir):
            if now - last_write(p) > idle_s:
                remove_tree(p)
        self.marks.sweep(marks_kept)
