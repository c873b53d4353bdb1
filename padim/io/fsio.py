"""Small helpers over fsspec so that every component reads and writes URLs the same way.

A *URL* here is anything fsspec understands: a local path (relative or absolute), ``file://...``
or ``s3://bucket/key``. Credentials and the endpoint of object stores are never passed by hand:
s3fs/botocore read the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` ...) and
fsspec's own configuration (``FSSPEC_S3_*`` variables or ``~/.config/fsspec``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.parse
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

__all__ = [
    "HASH_CHUNK_BYTES",
    "exists",
    "fsync_dir",
    "is_local",
    "join_url",
    "local_uri",
    "protocol_of",
    "read_bytes",
    "sha256_of",
    "to_url",
    "url_to_fs",
    "write_bytes_atomic",
]

HASH_CHUNK_BYTES = 8 * 1024 * 1024
"""Chunk size used when streaming a file through sha256 (files may be hundreds of MB)."""

_LOCAL_PROTOCOLS = frozenset({"file", "local"})


def _current_umask() -> int:
    """The process umask (read once at import, when no other thread can race the two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()
"""Mode of files written by :func:`write_bytes_atomic`: what ``open()`` would give (mkstemp gives 0600)."""


def url_to_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """Resolve a URL to its filesystem and the path inside it.

    A plain local path is taken literally (never parsed as an fsspec URL, where ``::`` chains
    filesystems and would cut ``dbl::colon.png`` short) and normalised: made absolute, ``.``,
    ``..`` and repeated ``/`` removed. A ``file://`` URL is percent-decoded (RFC 8089), which is how
    :func:`local_uri` writes file names that are not valid UTF-8.

    Args:
        url: A local path, ``file://`` URL or remote URL such as ``s3://bucket/key``.

    Returns:
        ``(fs, path)``; for local URLs ``path`` is absolute and normalised, for S3 it is
        ``bucket/key`` (no protocol), kept exactly (``::`` in a key included). The filesystem
        instance is fsspec's cached one for the default options.
    """
    url = os.fspath(url)
    scheme, separator, rest = url.partition("://")
    if separator and scheme.lower() in _LOCAL_PROTOCOLS:
        url = os.fsdecode(urllib.parse.unquote_to_bytes(rest))
    if not separator or scheme.lower() in _LOCAL_PROTOCOLS:
        return fsspec.filesystem("file"), os.path.normpath(os.path.abspath(os.path.expanduser(url)))
    if "::" in url:  # a key may contain "::"; fsspec would read it as a chain of filesystems
        fs = fsspec.filesystem(scheme.lower())
        return fs, fs._strip_protocol(url)
    fs, path = fsspec.core.url_to_fs(url)
    if is_local_fs(fs):
        path = os.path.normpath(path)
    return fs, path


def local_uri(path: str) -> str:
    """The URI of a local file as reports store it: the absolute path, or - for a name whose bytes
    are not valid UTF-8 - a ``file://`` URL with every byte outside unreserved ASCII and ``/``
    percent-encoded (lossless: :func:`url_to_fs` decodes it back to the same bytes).

    Args:
        path: Absolute local path as the OS returned it (undecodable bytes as surrogate escapes).

    Returns:
        ``path`` itself when it is valid UTF-8, else ``file://`` + the percent-encoded bytes.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote(os.fsencode(path), safe="/")
    return path


def protocol_of(url: str) -> str:
    """Return the protocol of a URL (``"file"`` for plain local paths).

    Args:
        url: Any fsspec URL or local path.

    Returns:
        The protocol name in lower case, e.g. ``"s3"`` or ``"file"``.
    """
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def is_local(url: str) -> bool:
    """Tell whether a URL points to the local filesystem (plain path or ``file://``).

    Args:
        url: Any fsspec URL or local path.

    Returns:
        True for local paths and ``file://``/``local://`` URLs.
    """
    return protocol_of(url) in _LOCAL_PROTOCOLS


def to_url(fs: AbstractFileSystem, path: str) -> str:
    """Turn a path returned by ``fs`` (e.g. from ``find``) back into a full URL.

    Args:
        fs: The filesystem the path belongs to.
        path: A path as fsspec returns it (``bucket/key`` for S3, absolute path locally).

    Returns:
        ``s3://bucket/key`` for remote filesystems; the plain absolute path for local ones.
    """
    if is_local_fs(fs):
        return local_uri(path)
    return fs.unstrip_protocol(path)


def join_url(base: str, *parts: str) -> str:
    """Join path segments onto a URL, keeping its protocol.

    ``join_url("s3://b/k", "x", "y.png") == "s3://b/k/x/y.png"``,
    ``join_url("/data", "x") == "/data/x"``, ``join_url("file:///data", "x") == "file:///data/x"``.
    Leading and trailing slashes of the parts are dropped and empty parts are skipped, so a part can
    never turn the result into an absolute path. This function does not check for ``..``; callers
    that join untrusted names must validate them (see :func:`padim.io.store.ModelStore.artifact_url`).

    Args:
        base: The base URL or local path.
        *parts: Segments to append; each may itself contain ``/``.

    Returns:
        The joined URL.
    """
    cleaned = [p.strip("/") for p in parts]
    cleaned = [p for p in cleaned if p]
    if not cleaned:
        return base
    if "://" in base:
        head = base.rstrip("/") if not base.endswith("://") else base
        sep = "" if head.endswith("://") else "/"
        return head + sep + "/".join(cleaned)
    return os.path.join(base, *cleaned)


def read_bytes(url: str) -> bytes:
    """Read a whole file.

    Args:
        url: File URL.

    Returns:
        The file's content.

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError, OSError: As raised by fsspec.
    """
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def browser_url(url: str, expires_s: int) -> str | None:
    """A URL a web browser (e.g. the Prefect UI) can open for a stored file, if there is one.

    Args:
        url: A stored file: ``s3://...``, ``http(s)://...`` or a local path.
        expires_s: Lifetime of a signed URL, in seconds.

    Returns:
        An S3 object's presigned ``https`` URL (credentials are not embedded: anyone with the link
        can read that one object until it expires), an ``http(s)`` URL as is, or ``None`` for a
        local file or any store that cannot sign URLs.
    """
    scheme = protocol_of(url)
    if scheme in {"http", "https"}:
        return url
    if is_local(url):
        return None
    fs, path = url_to_fs(url)
    try:
        return str(fs.sign(path, expiration=expires_s))
    except NotImplementedError:
        return None


def exists(url: str) -> bool:
    """Tell whether a file or folder (S3: object or prefix) exists.

    Args:
        url: Any URL.

    Returns:
        True when something exists at ``url``.
    """
    fs, path = url_to_fs(url)
    return bool(fs.exists(path))


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new one, never a mix.

    Locally the data go to a temporary file in the same folder (created if needed), are flushed
    and fsynced, then ``os.replace`` moves it over the target. On object stores a single PUT is
    already atomic, so the bytes are written in one request.

    Args:
        url: Target file URL.
        data: The complete new content.
    """
    fs, path = url_to_fs(url)
    if not is_local_fs(fs):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, _FILE_MODE)  # reports and heat maps must be readable like any other file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """Flush a local folder's entries to disk (best effort; a no-op where unsupported).

    Args:
        folder: Local folder path.
    """
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_of(url: str, chunk_bytes: int = HASH_CHUNK_BYTES) -> tuple[str, int]:
    """Stream a file through sha256 without loading it whole.

    Args:
        url: File URL.
        chunk_bytes: Read size per step.

    Returns:
        ``(hex digest, size in bytes)``.
    """
    fs, path = url_to_fs(url)
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def is_local_fs(fs: AbstractFileSystem) -> bool:
    """Tell whether a filesystem instance is the local one."""
    protocols: Any = fs.protocol
    names = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    return any(name in _LOCAL_PROTOCOLS for name in names)
