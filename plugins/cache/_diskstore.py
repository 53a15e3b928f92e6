"""A diskcache (SQLite) store of ``bytes`` values: shared by every API process, kept across restarts.

Used by ``cache=disk`` and ``cache=semantic store=disk``. Three things make it safe to point at a
folder whose content we did not write ourselves:

* **No pickle, ever.** diskcache's default ``Disk`` pickles any value that is not bytes/str/int/float
  and *unpickles* any row whose ``mode`` column says "pickle", so whoever can write the folder could
  run code in the server. ``BytesOnlyDisk`` stores only bytes, str and int (the counters ``incr``
  keeps) and refuses to pickle or unpickle anything: a pickled row is reported and dropped.
* **Every value is framed** as ``MAGIC + crc32 + payload``: a truncated file, garbage written into a
  row or a value file is detected, logged and treated as a miss (the entry is deleted), never served.
* **A row's file name never reaches the filesystem unchecked.** diskcache keeps large values in
  files named by the row (``filename`` column) and, when an entry is dropped, removes that file and
  its emptied parent folders. A planted ``../../somewhere`` would make a cache lookup read or delete
  any file the server can write. ``BytesOnlyDisk`` opens or removes a file only when its name has the
  exact shape diskcache writes (``ab/cd/<28 hex>.val``) and resolves inside the cache folder; any
  other name (or a file mode with no name) is a miss, and the row is dropped without touching a file.
* **The folder is private.** It is created with mode 0700. If it exists with group/other permission
  bits, they are removed (with a warning); if another user owns it, the store refuses to open it,
  because that user could plant or read responses.

A database that cannot be opened (a corrupted ``cache.db``) does not stop the server: the store
logs an error and answers every lookup with a miss; ``hydraserve cache clear`` (or deleting the
folder) resets it.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import stat
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
from diskcache.core import MODE_BINARY, MODE_PICKLE, MODE_RAW, MODE_TEXT, UNKNOWN

log = logging.getLogger("hydraserve.cache")

MAGIC = b"hsc1"
_HEADER = struct.Struct(">4sI")  # magic, crc32 of the payload
# Bodies up to this size live inline in the SQLite row (one indexed read per hit, no file to open);
# larger ones go to value files. diskcache's default is 32 KiB; a 32-text MiniLM answer is ~250 KiB.
MIN_FILE_SIZE = 1 << 20
# SQLite busy timeout. Readers never wait in WAL mode; a writer that cannot get the lock within this
# bound skips storing (a cache must never hold a request up).
DB_TIMEOUT_S = 1.0
EVICTION_POLICIES = tuple(diskcache.core.EVICTION_POLICY)
DB_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")
# The only value-file names diskcache's ``Disk.filename`` produces: two levels of two hex digits, then
# 28 hex digits and ".val". Anything else in a row's ``filename`` column was not written by us.
_VALUE_FILE_NAME = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")


class UnsafeEntry(Exception):
    """A stored entry that would need unpickling (or is otherwise not plain bytes/str/int)."""


class CacheFolderError(ValueError):
    """The cache folder cannot be used safely; the message names the key and the fix."""


# ------------------------------------------------------------------------------------ framing
def frame(payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, zlib.crc32(payload)) + payload


def unframe(data: bytes) -> bytes | None:
    """The payload, or ``None`` when ``data`` is not an intact frame."""
    if len(data) < _HEADER.size:
        return None
    magic, crc = _HEADER.unpack_from(data)
    payload = data[_HEADER.size:]
    if magic != MAGIC or zlib.crc32(payload) != crc:
        return None
    return payload


# ------------------------------------------------------------------------------ serialization
class BytesOnlyDisk(diskcache.Disk):
    """A diskcache ``Disk`` that never pickles: keys are str/bytes, values bytes/str/int."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) not in (str, bytes):
            raise TypeError(f"cache keys must be str or bytes, got {type(key).__name__} (no pickling)")
        return super().put(key)

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise UnsafeEntry("a key stored pickled")
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[int, int, str | None, Any]:
        if read:
            raise TypeError("file-like values are not accepted; pass bytes")
        if type(value) in (bytes, str) or (type(value) is int):
            return super().store(value, read, key=key)
        raise TypeError(f"cache values must be bytes, str or int, got {type(value).__name__} (no pickling)")

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if read:
            raise UnsafeEntry("file handles are not served")
        if mode == MODE_PICKLE:
            raise UnsafeEntry("a value stored pickled")
        if mode not in (MODE_RAW, MODE_BINARY, MODE_TEXT):
            raise UnsafeEntry(f"unknown storage mode {mode!r}")
        if mode != MODE_RAW and self.value_file(filename) is None:
            raise UnsafeEntry(f"its value file name {filename!r} is not one this cache writes")
        return super().fetch(mode, filename, value, read)

    def remove(self, file_path: Any) -> None:
        """Remove a value file, only if its name is one diskcache wrote inside the folder.

        diskcache calls this with the ``filename`` column of every row it drops (delete, eviction,
        expiry, clear), so the name is untrusted: a refused one is logged and left alone.
        """
        if self.value_file(file_path) is None:
            log.warning("response cache: refused to remove %r: not a value file name this cache writes "
                        "(a planted row?); the row was dropped and no file was touched", file_path)
            return
        super().remove(file_path)

    def value_file(self, filename: Any) -> str | None:
        """The full path of a row's value file, or ``None`` when the name is not safe to use."""
        if type(filename) is not str or not _VALUE_FILE_NAME.fullmatch(filename.replace(os.sep, "/")):
            return None
        root = os.path.realpath(self._directory)
        full = os.path.realpath(os.path.join(root, filename))
        # A folder inside the cache replaced by a symlink would lead the name outside: refuse it too.
        if os.path.commonpath([root, full]) != root:
            return None
        return full


# --------------------------------------------------------------------------------------- folder
def _own_uid() -> int:
    return os.geteuid()


def folder_problem(directory: str) -> str | None:
    """Why ``directory`` cannot be used (checked before the server starts), or ``None``."""
    folder = Path(os.path.expanduser(directory))
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} exists and is not a folder; point cache.directory at a folder"
        if os.name == "posix" and folder.stat().st_uid != _own_uid():
            return (f"{folder} is owned by uid {folder.stat().st_uid}, not by this user (uid {_own_uid()}); "
                    "another user could plant or read cached responses. Use a folder you own "
                    "(cache.directory=...)")
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable by this user; choose another cache.directory"
        return None
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {folder}: {parent} is not writable; choose another cache.directory"
    return None


def prepare_folder(directory: str) -> Path:
    """Create ``directory`` (mode 0700) or tighten an existing one to 0700; refuse a foreign one."""
    folder = Path(os.path.expanduser(directory))
    problem = folder_problem(directory)
    if problem is not None:
        raise CacheFolderError(f"cache.directory: {problem}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name == "posix":
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & 0o077:
            os.chmod(folder, 0o700)
            log.warning("cache folder %s had mode %o (readable or writable by other users); "
                        "changed it to 0700", folder, mode)
    return folder


# ---------------------------------------------------------------------------------------- store
class _Throttled:
    """At most one warning per kind every ``period`` seconds (a broken store must not flood logs)."""

    def __init__(self, period: float = 10.0):
        self.period = period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e9) < self.period:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            skipped = self._suppressed.pop(kind, 0)
        log.warning(msg + (f" ({skipped} similar warnings suppressed)" if skipped else ""), *args)


class DiskStore:
    """Framed ``bytes`` values in a diskcache folder; every failure is a logged miss, not a crash."""

    def __init__(self, directory: str, size_limit: int, ttl_s: float | None, eviction_policy: str,
                 statistics: bool = False):
        self.directory = directory
        self.size_limit = size_limit
        self.ttl_s = ttl_s
        self.eviction_policy = eviction_policy
        self.statistics = statistics
        self.folder: Path | None = None
        self.cache: diskcache.Cache | None = None
        self.broken: str | None = None  # why the database could not be opened
        self.hits = 0
        self.misses = 0
        self.corrupted = 0
        self._warn = _Throttled()

    # --- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        if self.cache is not None:
            return
        self.folder = prepare_folder(self.directory)
        try:
            self.cache = diskcache.Cache(
                str(self.folder), timeout=DB_TIMEOUT_S, disk=BytesOnlyDisk,
                size_limit=self.size_limit, eviction_policy=self.eviction_policy,
                statistics=int(self.statistics), disk_min_file_size=MIN_FILE_SIZE,
            )
            self.broken = None
        except (sqlite3.DatabaseError, diskcache.Timeout, OSError, UnsafeEntry) as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.error("response cache at %s cannot be opened (%s); serving without it. Run "
                      "`hydraserve cache clear` or delete the folder to reset it", self.folder, self.broken)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    # --- values -------------------------------------------------------------------------------
    def get(self, key: str, count: bool = True) -> bytes | None:
        value = self._read(key)
        if not count:
            return value
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def _read(self, key: str) -> bytes | None:
        if self.cache is None:
            return None
        try:
            data = self.cache.get(key, default=None, retry=False)
        except UnsafeEntry as exc:
            self._corrupt(key, f"refused to deserialize it ({exc}); nothing is ever unpickled")
            return None
        except (sqlite3.DatabaseError, diskcache.Timeout, OSError) as exc:
            self._warn.warn("read", "response cache read failed (%s: %s); treated as a miss",
                            type(exc).__name__, exc)
            return None
        if data is None:
            return None
        if type(data) is not bytes:
            self._corrupt(key, f"it holds a {type(data).__name__}, not response bytes")
            return None
        payload = unframe(data)
        if payload is None:
            self._corrupt(key, "its checksum does not match (truncated or overwritten)")
        return payload

    def _corrupt(self, key: str, why: str) -> None:
        self.corrupted += 1
        self._warn.warn("corrupt", "response cache entry %s in %s is unusable: %s; treated as a miss "
                        "and removed", key[:16], self.folder, why)
        self.delete(key)

    def put(self, key: str, value: bytes) -> bool:
        if self.cache is None:
            return False
        try:
            self.cache.set(key, frame(bytes(value)), expire=self.ttl_s, retry=False)
            return True
        except (sqlite3.DatabaseError, diskcache.Timeout, OSError) as exc:
            self._warn.warn("write", "response cache write failed (%s: %s); the answer was not stored",
                            type(exc).__name__, exc)
            return False

    def add(self, key: str, value: bytes) -> bytes | None:
        """Store ``value`` unless ``key`` exists; return what is stored under ``key`` afterwards."""
        if self.cache is None:
            return None
        try:
            self.cache.add(key, frame(value), retry=True)
        except (sqlite3.DatabaseError, diskcache.Timeout, OSError) as exc:
            self._warn.warn("write", "response cache write failed (%s: %s)", type(exc).__name__, exc)
        return self._read(key)

    def incr(self, key: str) -> int | None:
        """Atomically add one to the counter ``key`` (created at 0); ``None`` if the store failed."""
        if self.cache is None:
            return None
        try:
            return int(self.cache.incr(key, 1, default=0, retry=True))
        except (sqlite3.DatabaseError, diskcache.Timeout, OSError, UnsafeEntry, TypeError) as exc:
            self._warn.warn("write", "response cache counter %s failed (%s: %s)", key,
                            type(exc).__name__, exc)
            return None

    def get_int(self, key: str) -> int:
        if self.cache is None:
            return 0
        try:
            value = self.cache.get(key, default=0, retry=False)
        except (sqlite3.DatabaseError, diskcache.Timeout, OSError, UnsafeEntry):
            return 0
        return value if type(value) is int else 0

    def delete(self, key: str) -> None:
        if self.cache is None:
            return
        try:
            self.cache.delete(key, retry=True)
        except (sqlite3.DatabaseError, diskcache.Timeout, OSError, UnsafeEntry):
            pass

    def keys(self) -> Iterator[str]:
        """Every key (for admin commands; walks the whole table). Unreadable keys are skipped."""
        if self.cache is None:
            return
        try:
            for key in self.cache.iterkeys():
                yield key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        except (sqlite3.DatabaseError, diskcache.Timeout, UnsafeEntry) as exc:
            log.warning("stopped listing cache keys in %s: %s: %s", self.folder, type(exc).__name__, exc)

    # --- admin ------------------------------------------------------------------------------
    def clear(self) -> int:
        if self.cache is None:
            if self.broken is not None:
                return self._reset_broken()
            return 0
        n = int(self.cache.clear(retry=True))
        self.hits = self.misses = self.corrupted = 0
        if self.statistics:
            self.cache.stats(enable=True, reset=True)
        return n

    def _reset_broken(self) -> int:
        """Remove an unreadable database (only diskcache's own files) and start afresh."""
        assert self.folder is not None
        for name in DB_FILES:
            path = self.folder / name
            if path.exists():
                path.unlink()
        log.warning("removed the unreadable response cache database in %s", self.folder)
        self.broken = None
        self.open()
        return 0

    def stats(self) -> dict:
        out: dict[str, Any] = {"directory": str(self.folder or os.path.expanduser(self.directory)),
                               "size_limit": self.size_limit, "ttl_s": self.ttl_s,
                               "eviction_policy": self.eviction_policy}
        if self.cache is None:
            out.update(entries=0, bytes=0, hits=self.hits, misses=self.misses, broken=self.broken)
            return out
        if self.statistics:
            hits, misses = self.cache.stats()
            out.update(hits=hits, misses=misses, counted="all processes, since the last clear")
        else:
            out.update(hits=self.hits, misses=self.misses, counted="this process, since it opened the cache")
        try:
            out.update(entries=len(self.cache), bytes=int(self.cache.volume()))
        except (sqlite3.DatabaseError, diskcache.Timeout) as exc:
            out.update(error=f"{type(exc).__name__}: {exc}")
        out["corrupted_entries_dropped"] = self.corrupted
        return out
