"""Turn exceptions into the one-line ``error: <reason>`` the command line prints.

User errors (a wrong path, an unknown product, an invalid option value, a corrupt model) are
:class:`~padim.errors.PadimError`, pydantic ``ValidationError``, ``ValueError`` or ``OSError``
(``FileNotFoundError``, ``PermissionError``...). Anything else is a bug or an infrastructure
failure: it is reported as ``unexpected <Type>`` with a hint to rerun with ``--debug``, except
storage that cannot be reached (an S3 endpoint down, a connection refused or timed out), which is
reported as ``storage unreachable: ...`` with exit status 3: nothing is wrong with the command, and
re-running it once storage is back is safe. A failed
Prefect flow run re-raises its task's exception in-process; Prefect's own wrappers are unwrapped so
the original message is shown.
"""

from __future__ import annotations

import builtins
import re

__all__ = [
    "EXIT_STORAGE_UNREACHABLE",
    "EXIT_UNEXPECTED",
    "EXIT_USER_ERROR",
    "describe_error",
    "exit_code_for",
    "original_error",
]

EXIT_USER_ERROR = 1
EXIT_UNEXPECTED = 2
EXIT_STORAGE_UNREACHABLE = 3

UNREACHABLE_ERRORS = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "ConnectionAbortedError",
    }
)
"""Names of the botocore / aiohttp / builtin errors that mean storage could not be reached."""

_MAX_DEPTH = 10
_EXCEPTION_GROUP: type | tuple[type, ...] = getattr(builtins, "BaseExceptionGroup", ())


def _is_prefect_wrapper(exc: BaseException) -> bool:
    """Whether an exception is one of Prefect's wrappers around a run's real failure."""
    return type(exc).__module__.startswith("prefect") and (exc.__cause__ or exc.__context__) is not None


def original_error(exc: BaseException) -> BaseException:
    """The exception a user should see: Prefect wrappers and single-member groups unwrapped.

    Args:
        exc: The exception that reached the command line.

    Returns:
        The innermost meaningful exception.
    """
    for _ in range(_MAX_DEPTH):
        if isinstance(exc, _EXCEPTION_GROUP) and len(exc.exceptions) == 1:  # type: ignore[attr-defined]
            exc = exc.exceptions[0]  # type: ignore[attr-defined]
        elif _is_prefect_wrapper(exc):
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        else:
            break
    return exc


def _is_validation_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a pydantic ``ValidationError`` (without importing pydantic eagerly)."""
    return type(exc).__name__ == "ValidationError" and hasattr(exc, "errors")


def _one_line(text: str) -> str:
    """Collapse whitespace and newlines into single spaces."""
    return re.sub(r"\s+", " ", text).strip()


def _describe_validation(exc: BaseException) -> str:
    """``invalid <what>: field: message; ...`` for a pydantic ValidationError."""
    parts = []
    for item in exc.errors():  # type: ignore[attr-defined]
        location = ".".join(str(p) for p in item.get("loc", ()) if p != "__root__")
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    title = getattr(exc, "title", "") or "value"
    return f"invalid {_settings_name(title)}: " + "; ".join(parts)


def _settings_name(title: str) -> str:
    """``TrainSettings`` -> ``train settings``."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", title).lower()


def _describe_os_error(exc: OSError) -> str:
    """A readable sentence for a file-system error."""
    reason = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    if exc.filename is not None:
        return f"{reason}: {exc.filename}"
    return reason


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is something the user can fix (rather than a bug)."""
    from padim.errors import PadimError

    return isinstance(exc, (PadimError, ValueError, OSError, LookupError)) or _is_validation_error(exc)


def unreachable_cause(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s cause chain that says storage could not be reached, if any.

    Args:
        exc: Any exception.

    Returns:
        The connection error (botocore, aiohttp or builtin), or None.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in UNREACHABLE_ERRORS:
            return current
        current = current.__cause__ or current.__context__
    return None


def describe_error(exc: BaseException) -> str:
    """One line describing an error, without the ``error:`` prefix.

    Args:
        exc: Any exception (Prefect wrappers are unwrapped first).

    Returns:
        The reason, on one line.
    """
    exc = original_error(exc)
    unreachable = unreachable_cause(exc)
    if unreachable is not None:
        detail = _one_line(str(unreachable)) or type(unreachable).__name__
        return f"storage unreachable: {detail} (check the endpoint and the network; re-running is safe)"
    if _is_validation_error(exc):
        return _one_line(_describe_validation(exc))
    if isinstance(exc, OSError):
        return _one_line(_describe_os_error(exc))
    message = _one_line(str(exc))
    if isinstance(exc, KeyError) and message.startswith("'"):
        message = f"not found: {message}"
    if is_user_error(exc):
        return message or type(exc).__name__
    return f"unexpected {type(exc).__name__}: {message} (rerun with --debug for the traceback)"


def exit_code_for(exc: BaseException) -> int:
    """Exit status for an error: 1 for user errors, 3 for unreachable storage, 2 for anything else."""
    exc = original_error(exc)
    if unreachable_cause(exc) is not None:
        return EXIT_STORAGE_UNREACHABLE
    return EXIT_USER_ERROR if is_user_error(exc) else EXIT_UNEXPECTED
