"""The cap on open streaming calls (MLSIGNAL_MAX_STREAMS): a stream past it is refused at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from shared.errors import ResourceExhausted


class StreamLimit:
    """Counts the open streams of one kind in one server process and refuses the one past `limit`.

    Every caller runs on the server's single event loop, so a plain counter is enough (no lock).
    """

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.open = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one stream slot for the body of the `with`; ResourceExhausted when every slot is taken."""
        if self.open >= self.limit:
            raise ResourceExhausted(
                f"{self.open} {self.what} streams are open, the most this server takes (MLSIGNAL_MAX_STREAMS="
                f"{self.limit}); close a stream, retry later, or raise MLSIGNAL_MAX_STREAMS")
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1
