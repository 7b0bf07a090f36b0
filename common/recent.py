"""A bounded memory of recently seen keys, for state that peers can make grow without end.

The broker remembers sockets that answered and senders it warned about, and the pool's
counter streams; the client remembers the ids of settled requests. Each is keyed by
something a peer chooses (a socket identity, a pid, an epoch, a request id), so each must
forget: :class:`Recent` keeps at most ``limit`` keys and forgets the one put longest ago.
"""

from __future__ import annotations

from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most ``limit`` keys, each with a value; past that, the oldest put is forgotten.

    ``put`` of a key already held replaces its value and keeps its place (first in, first
    forgotten); ``touch`` moves it to the newest place (least recently used forgotten first).
    Not thread-safe: each owner uses it from one thread.
    """

    def __init__(self, limit: int) -> None:
        assert limit >= 1, limit
        self.limit = limit
        self._items: dict[K, V] = {}  # insertion-ordered: the first key is the oldest

    def put(self, key: K, value: V = None) -> bool:  # type: ignore[assignment]
        """Hold ``key`` (with ``value``); True if it was not held before."""
        new = key not in self._items
        self._items[key] = value
        if new and len(self._items) > self.limit:
            del self._items[next(iter(self._items))]
        return new

    def touch(self, key: K, value: V) -> None:
        """Hold ``key`` with ``value`` as the newest key, wherever it was before."""
        self._items.pop(key, None)
        self.put(key, value)

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._items.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
