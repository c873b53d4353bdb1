"""Reading one file's bytes from storage, with a timeout and retries.

What is a property of the file (a folder, gone, unreadable for its permissions, not a regular file)
is an :class:`~padim.errors.ImageDecodeError`: the image gets an error row. A *storage* fault - the
endpoint unreachable, a timeout, an I/O error - says nothing about the file: the read is retried
(:data:`READ_ATTEMPTS`), and if it still fails an :class:`~padim.errors.ImageReadError` stops the
work that needed the image, so its task is retried and, failing that, the run fails and names the
images it could not score.
"""

from __future__ import annotations

import os
import threading
import time

from fsspec import AbstractFileSystem

from padim.errors import ConfigError, ImageReadError
from padim.io.decoding import decode_error, describe_error
from padim.io.fsio import is_local_fs, url_to_fs
from padim.io.listing import is_special_local_file

__all__ = [
    "READ_ATTEMPTS",
    "READ_RETRY_WAIT_S",
    "READ_TIMEOUT_ENV_VAR",
    "READ_TIMEOUT_S",
    "read_raw",
    "read_timeout_s",
]

READ_ATTEMPTS = 3
"""Reads of one file before a storage fault fails the work (waits of 0.5 s, then 1 s, in between)."""

READ_RETRY_WAIT_S = 0.5
"""First wait before re-reading after a storage fault (doubled each time)."""

READ_TIMEOUT_S = 60.0
"""Longest wait for one read of one file before it counts as a storage fault (then retried like any
other). Set ``PADIM_READ_TIMEOUT_S`` to change it (seconds, > 0): a hung network mount or a stalled
endpoint then fails the work in bounded time instead of blocking the run forever."""

READ_TIMEOUT_ENV_VAR = "PADIM_READ_TIMEOUT_S"
"""Environment variable overriding :data:`READ_TIMEOUT_S`."""


def read_raw(uri: str) -> bytes:
    """Read a file's bytes.

    What is a property of the file becomes an :class:`ImageDecodeError` (the image gets an error
    row): it is a folder, it is gone, or - on a local disk - its permissions forbid reading or it is
    not a regular file (a FIFO, socket or device: refused before opening, never read). Any
    other failure is a storage fault: the read is retried, then :class:`ImageReadError` is raised.

    Raises:
        ImageDecodeError: The file itself cannot be read.
        ImageReadError: Storage failed :data:`READ_ATTEMPTS` times.
    """
    fs, path = url_to_fs(uri)
    local = is_local_fs(fs)
    if is_special_local_file(fs, path):
        raise decode_error(uri, "not a regular file (a FIFO, socket or device)")
    wait = READ_RETRY_WAIT_S
    timeout = read_timeout_s()
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return _cat_within(fs, path, timeout)
        except IsADirectoryError as exc:
            raise decode_error(uri, "is a folder, not a file") from exc
        except FileNotFoundError as exc:
            raise decode_error(uri, "file not found (removed after listing?)") from exc
        except PermissionError as exc:
            if local:
                raise decode_error(uri, "permission denied") from exc
            fault: Exception = exc  # remote access denied: credentials or policy, not the file
        except Exception as exc:
            fault = exc
        if attempt < READ_ATTEMPTS:
            time.sleep(wait)
            wait *= 2
    raise ImageReadError(uri, f"{type(fault).__name__}: {describe_error(fault)}") from fault


def read_timeout_s() -> float:
    """The read timeout in force: ``PADIM_READ_TIMEOUT_S`` when set, else :data:`READ_TIMEOUT_S`.

    Raises:
        ConfigError: ``PADIM_READ_TIMEOUT_S`` is not a positive number of seconds.
    """
    raw = os.environ.get(READ_TIMEOUT_ENV_VAR, "").strip()
    if not raw:
        return READ_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise ConfigError(f"{READ_TIMEOUT_ENV_VAR} must be a positive number of seconds, got {raw!r}")
    return value


def _cat_within(fs: AbstractFileSystem, path: str, timeout: float) -> bytes:
    """Read a whole file, giving up after ``timeout`` seconds.

    The read runs in a daemon thread: a read blocked in the kernel (a hung network mount) or in a
    stalled connection cannot be cancelled, but the caller stops waiting for it, so the fault is
    retried and then reported like any other storage fault, and the process can still exit.

    Raises:
        TimeoutError: No answer within ``timeout`` seconds.
        Exception: Whatever the read raised.
    """
    outcome: dict[str, object] = {}
    done = threading.Event()

    def read() -> None:
        try:
            outcome["data"] = fs.cat_file(path)
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=read, name="padim-read", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"no answer from storage within {timeout:g} s ({READ_TIMEOUT_ENV_VAR})")
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    return outcome["data"]  # type: ignore[return-value]
