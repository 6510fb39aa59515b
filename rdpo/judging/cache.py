"""A persistent judgment cache (sqlite), so a repeated judgment is never requested twice.

The key hashes everything a judgment depends on: the judge (backend, model, endpoint URL,
max_tokens, temperature), the prompt template and parser versions, the exact prompt text
(instructions, question, criterion texts with their ids, the response as shown) and the content
hash of every image (not its path: a moved pool still hits, an edited image misses). A resumed
run, a re-scored response or a second evaluation reads its verdicts here.

SQLite's locking does not hold across the hosts of a network filesystem (WAL mode needs every
process on one host), so a run of several ranks gives each rank its own file
(``judge_cache.rank3.sqlite``: `rank_path`); a rank judges the same prompts again after a resume
with the same world size, so it finds its verdicts in its own file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from rdpo.judging.chat import ChatRequest, image_hash


def judgment_key(identity: Mapping[str, object], request: ChatRequest) -> str:
    """sha256 over the judge's `identity` (canonical JSON: model, endpoint, sampling, template
    and parser versions), the request's system and user text and its images' content hashes."""
    h = hashlib.sha256()
    for part in (json.dumps(identity, sort_keys=True), request.system or "", request.text,
                 *(image_hash(p) for p in request.images)):
        h.update(part.encode("utf-8"))
        h.update(b"\0")  # separator: ("ab", "c") and ("a", "bc") must not collide
    return h.hexdigest()


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed's once it is up, else the
    launcher's RANK and WORLD_SIZE (both, or a single process)."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)  # never up if torch is not in
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def rank_path(path: str | os.PathLike) -> Path:
    """`path` in a single-process run; with several ranks, this rank's own file beside it
    (``judge_cache.sqlite`` -> ``judge_cache.rank3.sqlite``)."""
    path = Path(path)
    rank, world = _rank_and_world()
    return path if world <= 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


class JudgeCache:
    """Key -> JSON value on disk; `get_many` / `put_many` keep round trips few.

    Safe to share between threads of one process (one connection, a lock) and between
    processes of one host (sqlite's own locking; WAL journal so readers do not block the
    writer); never between hosts. `per_rank`: open `rank_path` of `path`, at first use (when
    the run's ranks are known), instead of `path` at once.
    """

    def __init__(self, path: str | os.PathLike, *, per_rank: bool = False):
        self.path = self._given = Path(path)
        self._per_rank = per_rank
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if not per_rank:
            self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self.path = rank_path(self._given) if self._per_rank else self._given
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS judgments "
                       "(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.commit()
        except sqlite3.DatabaseError as err:
            raise ValueError(f"judge cache {self.path}: not a usable sqlite file ({err})") from None
        self._db = db
        return db

    def get_many(self, keys: Iterable[str]) -> dict[str, object]:
        """The cached values of those `keys` that are present."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, object] = {}
        with self._lock:
            db = self._connect()
            for start in range(0, len(keys), 500):  # sqlite caps the number of parameters
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT key, value FROM judgments WHERE key IN ({marks})", chunk)
                out.update((k, json.loads(v)) for k, v in rows)
        return out

    def put_many(self, items: dict[str, object]) -> None:
        """Store (or overwrite) values; committed before returning."""
        if not items:
            return
        with self._lock:
            db = self._connect()
            db.executemany("INSERT OR REPLACE INTO judgments (key, value) VALUES (?, ?)",
                           [(k, json.dumps(v)) for k, v in items.items()])
            db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._connect().execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
