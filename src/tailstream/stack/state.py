"""What a running stack leaves in its data folder: the lock that keeps a second stack out,
and ``stack.json``, which tells other commands where the stack is.

* **The lock** (``{data_dir}/stack.lock``, an exclusive ``flock`` held for the life of the
  process that runs the services): a second ``tailstream up`` or ``demo`` in the same
  folder stops at once with a message naming the running stack, instead of sharing its
  logs and model store and deleting its ``stack.json`` on the way out.
* **stack.json** holds the endpoints (the Redis URL with its password, so ``tailstream
  recs`` can connect), the children's pids and their metrics URLs. It is written
  atomically with mode 0600: readable by its owner only. Anything *printed* shows the URL
  with the password masked (:func:`display_url`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"


def display_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and terminals).

    >>> display_url("redis://:hunter2@redis:6379/0"), display_url("redis://127.0.0.1:6379/0")
    ('redis://:***@redis:6379/0', 'redis://127.0.0.1:6379/0')
    >>> display_url("rediss://alice:s3cret@host/1")
    'rediss://alice:***@host/1'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass
class StackInfo:
    """Where the running stack is (``{data_dir}/stack.json``)."""

    kafka_bootstrap: str
    redis_url: str
    embedded: bool
    pids: dict[str, int]
    metrics: dict[str, str] = field(default_factory=dict)
    """Name → its /metrics URL (workers, trainer, and ``up`` itself as ``stack``)."""
    owner_pid: int = field(default_factory=os.getpid)

    def write(self, path: Path) -> None:
        """Atomically, mode 0600 (the Redis URL may hold a password)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(asdict(self), fh, indent=2)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def read(cls, path: Path) -> StackInfo | None:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError:
            return None


class StackRunning(RuntimeError):
    """Another stack holds this data folder."""


class FolderLock:
    """An exclusive lock on a data folder, held until :meth:`release` (or process exit)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fh: IO[str] | None = None

    def acquire(self) -> FolderLock:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held for the life of the stack
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise StackRunning(self._running_message(holder)) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def _running_message(self, holder: str) -> str:
        info = StackInfo.read(self.data_dir / STATE_FILE)
        where = (f", broker {info.kafka_bootstrap}, redis {display_url(info.redis_url)}"
                 if info is not None else "")
        return (f"another tailstream stack is running with the data folder {self.data_dir} "
                f"(pid {holder}{where}): stop it first, or give this one its own folder "
                f"with --data-dir")

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
