"""The serving core's refusals: one exception type per kind of failure, with one clear message.

The pool, the scheduler, the engine's batch (runtime/generate.py) and the request path (runtime/core.py)
raise these where a failure is detected; each frontend maps the kind to its own status in one table
(gRPC status codes in runtime/service.py, HTTP statuses in runtime/http.py), so the core names no
transport.
"""
from __future__ import annotations


class ServeError(Exception):
    """A request that cannot be served; the subclass says why, `message` says it to the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    """The request itself is wrong (a value out of range, a malformed ref, a merge that cannot be made)."""


class NotFound(ServeError):
    """A named adapter does not exist (or, for unload, is not loaded)."""


class Unusable(ServeError):
    """The adapter exists but cannot serve here now (unreadable, refused, in use by running requests)."""


class WrongBase(Unusable):
    """The adapter was made for another base model than the one served."""


class NoRoom(ServeError):
    """The adapter memory budget has no room for the request's adapters (now or within the wait)."""


class TooLarge(NoRoom):
    """One adapter needs more device memory than the whole adapter budget: no wait can help."""


class QueueFull(ServeError):
    """The request queue or the in-flight request slots are full; retry later."""


class DamagedData(ServeError):
    """Stored bytes are damaged, or an adapter produced non-finite numbers: the answer is lost."""


class Unavailable(ServeError):
    """The server is shutting down, or the registry cannot be read."""


class Cancelled(ServeError):
    """The client went away while the request waited."""


class Internal(ServeError):
    """A failure that is the server's fault (a batch step that raised)."""
