"""One exception hierarchy. The CLI maps each class to a one-line message and an exit code."""

from typing import Any


class MlxLlamaError(Exception):
    """Base of every error mlxllama raises on purpose."""

    exit_code = 1


class UsageError(MlxLlamaError, ValueError):
    """Bad arguments: out-of-range sampling values, empty prompt, prompt longer than the context."""

    exit_code = 2


class ModelFileError(MlxLlamaError):
    """A model file or folder is missing, malformed, hostile or unsupported."""

    exit_code = 3


class ConfigError(ModelFileError):
    """config.json or GGUF metadata is missing keys, has wrong types, or contradicts itself."""


class NetworkError(MlxLlamaError):
    """The hub could not be reached, or refused the request (404, 401/403, offline)."""

    exit_code = 4


class Interrupted(MlxLlamaError):
    exit_code = 130


def shown(value: Any, limit: int = 80) -> str:
    """repr() of a value read from an untrusted file, cut short: error messages stay one short line."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def plain(name: str, limit: int = 80) -> str:
    """A name from a file as is when it is short and printable, else shown()."""
    return name if isinstance(name, str) and name.isprintable() and len(name) <= limit else shown(name, limit)


def first_line(e: Exception) -> str:
    """The first line of an exception's message (a library's multi-line error becomes one line of ours)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
