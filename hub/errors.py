"""Registry errors. Each carries one line a user can act on; the CLI prints it and exits non-zero."""
from __future__ import annotations


class HubError(Exception):
    """Base of every registry/remote failure that leaves the registry as it was."""


class InvalidName(HubError, ValueError):
    """A name, version, tag or reference that is malformed or could escape the store."""


class NotFound(HubError, LookupError):
    """A reference, version, tag or remote that does not exist."""


class Conflict(HubError):
    """A version that already exists with different content (versions are immutable)."""


class IntegrityError(HubError):
    """Stored bytes whose size or sha256 differ from what the manifest records."""


class IndexCorrupt(HubError):
    """A registry.json that is not valid JSON or does not match the published schema."""


class RemoteError(HubError):
    """A remote that cannot be reached or does not hold what was asked for."""
