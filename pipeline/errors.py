"""The errors a user can cause (a bad config, a step run before its inputs exist, an object store that
cannot be reached). The CLI prints their message as one line and exits with status 2; every other
exception is a bug and keeps its traceback."""

from __future__ import annotations


class PadistillError(Exception):
    """A user's mistake or environment: the message says what is wrong and what to do."""


class ConfigError(PadistillError, ValueError):
    """A bad run config: the message names the key and the reason."""


class MissingInputError(PadistillError, FileNotFoundError):
    """A step's input is not there yet (run the step that makes it first) or a path does not exist."""


class StorageError(PadistillError, ConnectionError):
    """The run root's object store cannot be reached or refuses the credentials."""


class UnsafeCheckpointError(PadistillError, ValueError):
    """A checkpoint in the run root holds objects that would run code when unpickled."""


class ClusterError(PadistillError, ConnectionError):
    """The Ray cluster (its job server) cannot be reached."""


def _chain(exc: BaseException, limit: int = 20):
    """`exc` and what it wraps: Ray's task errors (`.cause`), Ray Train's worker and controller failures,
    then Python's `__cause__`/`__context__`."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < limit:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), getattr(e, "controller_failure", None),
                 *(getattr(e, "worker_failures", None) or {}).values(), e.__cause__, e.__context__]


def user_error(exc: BaseException) -> PadistillError | None:
    """`exc` as a user error, or None for a bug: our own errors (also when raised inside a Ray task or a
    Ray Data actor), and an unreachable S3 endpoint or missing credentials."""
    chain = list(_chain(exc))
    ours = [e for e in chain if isinstance(e, PadistillError)]
    if ours:  # the innermost: a RayTaskError subclass of ours would print the remote traceback
        return ours[-1]
    try:
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError
    except ImportError:  # pragma: no cover - botocore ships with s3fs, a dependency
        return None
    for e in chain:
        if isinstance(e, NoCredentialsError):
            return StorageError("S3: no credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                                "storage.profile")
        if isinstance(e, EndpointConnectionError):
            return StorageError(f"S3: {e}; check storage.endpoint_url and that the endpoint is up")
    return None

