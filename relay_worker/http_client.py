"""What every outgoing HTTP call of the project shares: they all use httpx (admission's verifiers,
the admin unix sockets, the prober); this is where httpx's errors are read back as socket errors."""

from __future__ import annotations


def os_error_of(exc: BaseException) -> OSError | None:
    """The socket error under an httpx error: httpx and httpcore wrap it in their own classes (as the
    cause, the context, or the argument), and anyio's connect wraps each attempt's error in an OSError
    without an errno. Returns the innermost OSError."""
    found: OSError | None = None
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short; a bound keeps a cycle from looping
        if seen is None:
            break
        if isinstance(seen, OSError):
            found = seen
        inner = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = seen.__cause__ or inner or seen.__context__
    return found
