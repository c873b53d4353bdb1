"""Image listing: the image files under a folder or object-store prefix, on any fsspec URL.

:func:`list_images` lists recursively, keeps the wanted extensions (case-insensitively), leaves out
hidden names and - on a local disk - FIFOs, sockets and device files (reading one could block
forever), and sorts the URIs so that every run sees the same order.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Sequence

from fsspec import AbstractFileSystem

from padim.errors import ConfigError, ImageSourceError
from padim.io.fsio import is_local, is_local_fs, to_url, url_to_fs

__all__ = ["DEFAULT_EXTENSIONS", "is_special_local_file", "list_images"]

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")
"""File extensions :func:`list_images` keeps by default (matched case-insensitively)."""


def list_images(
    url: str,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    include_hidden: bool = False,
) -> list[str]:
    """List image files under a folder or object-store prefix, recursively.

    Args:
        url: Folder URL: a local path, ``file://...`` or ``s3://bucket/prefix``.
        extensions: Extensions to keep, with or without a dot, matched case-insensitively.
        include_hidden: Also list files or folders whose name starts with ``.`` (skipped by
            default: ``.ipynb_checkpoints``, macOS ``._x.png`` resource forks and the like).

    Returns:
        Full URIs sorted lexicographically (deterministic): ``s3://bucket/key`` for S3 (keys kept
        exactly); for local folders the normalised absolute path below the folder's real path
        (symlinks of the folder resolved, ``..`` and ``//`` removed), so a folder named in several
        ways gives the same URIs; a name whose bytes are not valid UTF-8 as a percent-encoded
        ``file://`` URL (:func:`padim.io.fsio.local_uri`). An existing folder without images gives ``[]``.

    Raises:
        ImageSourceError: The folder does not exist, is a file, or cannot be listed.
    """
    wanted = _normalise_extensions(extensions)
    fs, root = url_to_fs(url)
    if is_local(url):
        root = os.path.realpath(root)  # one URI per file, whichever symlinked name the folder was given by
    try:
        fs.invalidate_cache(root)
        if not fs.isdir(root):
            if fs.exists(root):
                raise ImageSourceError(f"not a folder: {url}")
            raise ImageSourceError(f"no such folder: {url}")
        paths = _without_special_files(fs, fs.find(root, withdirs=False))
    except PermissionError as exc:
        raise ImageSourceError(f"cannot list {url}: permission denied") from exc
    except FileNotFoundError as exc:
        raise ImageSourceError(f"no such folder: {url}") from exc
    except OSError as exc:
        raise ImageSourceError(f"cannot list {url}: {exc}") from exc
    prefix = root.rstrip("/") + "/"
    kept = [to_url(fs, p) for p in paths if _has_extension(p, wanted) and (include_hidden or not _is_hidden(p, prefix))]
    return sorted(kept)


def is_special_local_file(fs: AbstractFileSystem, path: str) -> bool:
    """True for a local path that exists and is neither a regular file nor a folder.

    FIFOs, sockets and device files: opening one for reading can block forever (a FIFO waits for
    a writer) or never end (``/dev/zero``). Symbolic links are followed; a path that cannot be
    examined is left to the read, which reports it. Object stores hold only regular objects.
    """
    if not is_local_fs(fs):
        return False
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _without_special_files(fs: AbstractFileSystem, paths: Iterable[str]) -> list[str]:
    """Drop local FIFOs, sockets and device files from a listing, with a warning naming each."""
    kept = []
    for path in paths:
        if is_special_local_file(fs, path):
            logger.warning("skipping %s: not a regular file (a FIFO, socket or device)", path)
        else:
            kept.append(path)
    return kept


def _normalise_extensions(extensions: Sequence[str]) -> frozenset[str]:
    """Lower-case extensions without their leading dot."""
    if isinstance(extensions, str):
        extensions = (extensions,)
    wanted = frozenset(e.lower().lstrip(".") for e in extensions if e.strip("."))
    if not wanted:
        raise ConfigError("extensions must name at least one file extension, e.g. ('png', 'jpg')")
    return wanted


def _has_extension(path: str, wanted: frozenset[str]) -> bool:
    """True when the file name ends with one of the wanted extensions (case-insensitive)."""
    name = path.rsplit("/", 1)[-1]
    _, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in wanted


def _is_hidden(path: str, root_prefix: str) -> bool:
    """True when a component of ``path`` below the listed root starts with a dot."""
    relative = path[len(root_prefix) :] if path.startswith(root_prefix) else path
    return any(part.startswith(".") for part in relative.split("/"))
