"""A thread-safe LRU cache of image embeddings, bounded in entries and in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class EmbeddingCache:
    """LRU map from image key to embedding; each value reports its size as `.nbytes`."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Any | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: Any) -> None:
        """Store `value`, evicting the least recently used; values larger than the whole budget are skipped."""
        size = int(value.nbytes)
        if self.max_entries < 1 or size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key], self._sizes[key] = value, size
            self.nbytes += size
            while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        del self._items[key]
        self.nbytes -= self._sizes.pop(key)
