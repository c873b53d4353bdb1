"""The partial statistics of a fit shard, as a safetensors file beside the model versions.

A fit shard writes its :class:`~padim.core.statistics.GaussianAccumulator` (:func:`save_statistics`,
atomically) and the finalising task reads every partial back (:func:`load_statistics`) and merges
them exactly, in any order.
"""

from __future__ import annotations

import os
import tempfile

import fsspec
import torch
from safetensors.torch import save_file

from padim.core.statistics import GaussianAccumulator
from padim.errors import ModelIntegrityError, ModelNotFoundError
from padim.io.fsio import is_local_fs


def save_statistics(accumulator: GaussianAccumulator, url: str, metadata: dict[str, str] | None = None) -> None:
    """Write an accumulator's partial state as one safetensors file (for shard merging).

    The file is built locally and then copied, so a reader never sees half of it on an object
    store (one PUT) and, locally, it is renamed into place.

    Args:
        accumulator: The statistics.
        url: Target file URL.
        metadata: String metadata stored in the safetensors header (e.g. the configuration
            identity, so that incompatible partials are never merged).
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    header = {"format": "padim.gaussian-accumulator/1", **(metadata or {})}
    state = {k: v.cpu() for k, v in accumulator.state_dict(packed=True).items()}
    if is_local_fs(fs):
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".tmp-", suffix=".safetensors", delete=False) as tmp:
            temp_name = tmp.name
        try:
            save_file(state, temp_name, metadata=header)
            os.replace(temp_name, path)
        finally:
            if os.path.exists(temp_name):
                os.unlink(temp_name)
        return
    with tempfile.TemporaryDirectory(prefix="padim-stats-") as scratch:
        local = os.path.join(scratch, "statistics.safetensors")
        save_file(state, local, metadata=header)
        fs.put_file(local, path)


def load_statistics(url: str, device: str | torch.device = "cpu") -> tuple[GaussianAccumulator, dict[str, str]]:
    """Read a partial state written by :func:`save_statistics`.

    Args:
        url: File URL.
        device: Device for the state tensors.

    Returns:
        The accumulator and the file's string metadata.

    Raises:
        ModelNotFoundError: If the file does not exist.
        ModelIntegrityError: If it is not a valid statistics file.
    """
    from safetensors import safe_open

    fs, path = fsspec.core.url_to_fs(url)
    with tempfile.TemporaryDirectory(prefix="padim-stats-") as scratch:
        if is_local_fs(fs):
            local = path
        else:
            local = os.path.join(scratch, "statistics.safetensors")
            try:
                fs.get_file(path, local)
            except FileNotFoundError as exc:
                raise ModelNotFoundError(f"no statistics file at {url}") from exc
        if not os.path.exists(local):
            raise ModelNotFoundError(f"no statistics file at {url}")
        try:
            with safe_open(local, framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelIntegrityError(f"statistics file {url} is corrupt: {exc}") from exc
    if metadata.get("format") != "padim.gaussian-accumulator/1":
        raise ModelIntegrityError(f"{url} is not a padim statistics file")
    return GaussianAccumulator.from_state_dict(state, device=device), metadata
