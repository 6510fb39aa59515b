"""A persistent judgment cache (sqlite), so a repeated judgment is never requested twice.

The key hashes everything a judgment depends on: the judge model, the prompt template version,
the exact prompt text (instruction, criterion texts with their ids, the response verbatim) and
the content hash of every image (not its path: a moved pool still hits, an edited image
misses). A resumed run, a re-scored response or a second evaluation reads its verdicts here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from rdpo.chat import image_hash


def judgment_key(model: str, template_version: int, prompt: str, images: Sequence[Path]) -> str:
    """sha256 over the model name, template version, prompt text and image content hashes."""
    h = hashlib.sha256()
    for part in (model, str(template_version), prompt, *(image_hash(p) for p in images)):
        h.update(part.encode("utf-8"))
        h.update(b"\0")  # separator: ("ab", "c") and ("a", "bc") must not collide
    return h.hexdigest()


class JudgeCache:
    """Key -> JSON value on disk; `get_many` / `put_many` keep round trips few.

    Safe to share between threads of one process (one connection, a lock) and between
    processes (sqlite's own locking; WAL journal so readers do not block the writer).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS judgments "
                             "(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()
        except sqlite3.DatabaseError as err:
            raise ValueError(f"judge cache {self.path}: not a usable sqlite file ({err})") from None

    def get_many(self, keys: Iterable[str]) -> dict[str, object]:
        """The cached values of those `keys` that are present."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, object] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # sqlite caps the number of parameters
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, value FROM judgments WHERE key IN ({marks})", chunk)
                out.update((k, json.loads(v)) for k, v in rows)
        return out

    def put_many(self, items: dict[str, object]) -> None:
        """Store (or overwrite) values; committed before returning."""
        if not items:
            return
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO judgments (key, value) VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in items.items()])
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
