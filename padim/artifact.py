"""The on-disk (or object-store) form of a model version: safetensors plus a JSON manifest.

A model version is one directory (any fsspec URL) holding:

* ``model.safetensors`` - ``mean (G, d)``, the lower-triangular whitening factor packed row by
  row as ``factor_packed (G, d (d + 1) / 2)`` (``G = P`` Gaussians, one per position; 1 or
  ``P + 1`` with shared statistics, see :func:`padim.model.num_gaussians`), the channel reduction
  (``channel_indices (d,)`` or ``projection (D, d)``) and, for registration, the gray
  ``reference (S, S)``;
* ``statistics.safetensors`` - the raw accumulator (``n``, ``mean``, and the lower triangle of the
  symmetric ``m2`` as ``m2_packed``, all float64), so that
  new normal images can be added later without re-extracting the old ones (optional);
* ``training_images.json`` - ``{"fit": [[uri, sha256], ...], "calibration": [...]}``: the images
  in the statistics and the held-out images the thresholds were calibrated on;
* ``manifest.json`` - configuration, backbone and weights identity, taps, normalisation,
  thresholds, provenance, library version and the sha256 and size of every other file.

Nothing is pickled: safetensors and JSON cannot run code when read. :func:`load_model` verifies
every checksum before parsing a tensor and refuses artifacts the running code cannot serve.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file

import padim
from padim.backbones import get_spec
from padim.config import PadimConfig
from padim.embedding import EmbeddingProjector
from padim.errors import IncompatibleModelError, ModelIntegrityError, ModelNotFoundError, PadimError
from padim.model import PadimModel, Thresholds, TrainingInfo, grid_size, num_gaussians, resolve_channels
from padim.statistics import GaussianAccumulator, pack_lower, unpack_lower
from padim.store import check_manifest_weights

MODEL_FORMAT = "padim.model/1"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
STATISTICS_FILE = "statistics.safetensors"
TRAINING_FILE = "training_images.json"
_CHUNK = 1 << 20


def training_set_digest(hashes: list[str]) -> str:
    """Order-independent digest of a set of image content hashes.

    Args:
        hashes: sha256 hex digests of the training images.

    Returns:
        sha256 hex digest of the sorted, newline-joined list.
    """
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _sha256_stream(handle: Any) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: handle.read(_CHUNK), b""):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _model_tensors(model: PadimModel) -> dict[str, torch.Tensor]:
    tensors = {
        "mean": model.mean.detach().float().cpu().contiguous(),
        "factor_packed": pack_lower(model.factor.detach().cpu()),
    }
    if model.projector.indices is not None:
        tensors["channel_indices"] = model.projector.indices.cpu().contiguous()
    if model.projector.projection is not None:
        tensors["projection"] = model.projector.projection.cpu().contiguous()
    if model.reference is not None:
        tensors["reference"] = model.reference.detach().float().cpu().contiguous()
    return tensors


def build_manifest(model: PadimModel, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a model version.

    Args:
        model: The fitted model.
        files: ``{name: {"sha256": hex, "size": bytes}}`` of every tensor/data file.

    Returns:
        A JSON-serialisable dictionary.
    """
    spec = model.spec
    config = model.config
    indices = model.projector.indices
    return {
        "format": MODEL_FORMAT,
        "library_version": padim.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": config.backbone,
        "weights_sha256": model.weights_sha256,
        "weights_source": config.weights,
        "taps": list(spec.taps),
        "strides": list(spec.strides),
        "image_size": config.image_size,
        "crop_size": config.crop_size,
        "resize_mode": config.resize_mode,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "channels": model.channels,
        "channel_selection": config.channel_selection,
        "channel_indices": indices.tolist() if indices is not None else None,
        "grid": list(model.grid),
        "eps": config.eps,
        "covariance": config.covariance,
        "factor": "cholesky-inverse",
        "factor_dtype": str(model.factor.dtype).removeprefix("torch."),
        "n_train": model.training.n_train,
        "training_set_sha256": model.training.training_set_sha256,
        "thresholds": asdict(model.thresholds) if model.thresholds is not None else None,
        "config": config.model_dump(mode="json"),
        "files": files,
    }


def save_model(model: PadimModel, url: str, keep_statistics: bool = True) -> dict[str, Any]:
    """Write a model version into a directory URL (local path or object store).

    Tensor files are written first, their checksums computed from what was written, and the
    manifest last. Publication atomicity (``latest`` pointer, staging) is the model store's job.

    Args:
        model: The fitted model.
        url: Target directory; created if needed.
        keep_statistics: Also write the float64 accumulator (needed for incremental refits).

    Returns:
        The manifest written.
    """
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    payload: dict[str, dict[str, torch.Tensor] | bytes] = {MODEL_FILE: _model_tensors(model)}
    if keep_statistics and model.accumulator is not None:
        payload[STATISTICS_FILE] = {k: v.cpu() for k, v in model.accumulator.state_dict(packed=True).items()}
    images = {
        "fit": [list(pair) for pair in model.training.training_images],
        "calibration": [list(pair) for pair in model.training.calibration_images],
    }
    payload[TRAINING_FILE] = json.dumps(images).encode()
    files: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="padim-save-") as scratch:
        for name, content in payload.items():
            local = Path(scratch) / name
            if isinstance(content, bytes):
                local.write_bytes(content)
            else:
                save_file(content, str(local), metadata={"format": MODEL_FORMAT})
            with open(local, "rb") as handle:
                digest, size = _sha256_stream(handle)
            files[name] = {"sha256": digest, "size": size}
            fs.put_file(str(local), f"{root}/{name}")
    manifest = build_manifest(model, files)
    with fs.open(f"{root}/{MANIFEST}", "wb") as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def read_manifest(url: str) -> dict[str, Any]:
    """Read and parse the manifest of a model version.

    Args:
        url: Model version directory.

    Returns:
        The manifest.

    Raises:
        ModelNotFoundError: If there is no manifest.
        ModelIntegrityError: If it is not valid JSON.
    """
    fs, root = fsspec.core.url_to_fs(url)
    try:
        raw = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"no model manifest at {url}") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise ModelIntegrityError(f"model manifest at {url} is not valid JSON") from exc
    if not isinstance(manifest, dict):
        raise ModelIntegrityError(f"model manifest at {url} is not a JSON object")
    return manifest


def check_servable(manifest: dict[str, Any]) -> PadimConfig:
    """Check that the running code can serve a manifest, and parse its configuration.

    Args:
        manifest: A model manifest.

    Returns:
        The model's configuration.

    Raises:
        IncompatibleModelError: For another format, an unknown backbone or configuration field.
    """
    if manifest.get("format") != MODEL_FORMAT:
        raise IncompatibleModelError(
            f"model format {manifest.get('format')!r} cannot be served by padim {padim.__version__} "
            f"(expects {MODEL_FORMAT})"
        )
    try:
        config = PadimConfig.model_validate(manifest.get("config", {}))
        spec = get_spec(config.backbone)
    except (ValidationError, ValueError) as exc:
        raise IncompatibleModelError(f"model configuration cannot be served: {exc}") from exc
    if list(spec.taps) != list(manifest.get("taps", [])):
        raise IncompatibleModelError(
            f"model taps {manifest.get('taps')} differ from this code's {list(spec.taps)} for {spec.name}"
        )
    return config


def _fetch_verified(fs: fsspec.AbstractFileSystem, root: str, name: str, entry: dict[str, Any], scratch: str) -> str:
    """Return a local path of a verified artifact file (remote files are downloaded first)."""
    remote = f"{root}/{name}"
    if not fs.exists(remote):
        raise ModelIntegrityError(f"model file {name} is missing")
    if _is_local(fs):
        local = remote
    else:
        local = os.path.join(scratch, name)
        fs.get_file(remote, local)
    with open(local, "rb") as handle:
        digest, size = _sha256_stream(handle)
    if digest != entry.get("sha256") or size != entry.get("size"):
        raise ModelIntegrityError(
            f"checksum mismatch for {name}: the model file was altered or truncated after publishing"
        )
    return local


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    # Read into memory for small files; memory-map through load_file for big ones.
    if os.path.getsize(path) < (64 << 20):
        with open(path, "rb") as handle:
            return load_safetensors_bytes(handle.read())
    return load_file(path)


def load_model(url: str, device: str | torch.device = "cpu", with_statistics: bool = False) -> PadimModel:
    """Load and verify a model version.

    Args:
        url: Model version directory (local or fsspec URL).
        device: Device for the model's tensors.
        with_statistics: Also load the float64 accumulator (for incremental refits).

    Returns:
        The model. Its backbone is loaded lazily on first prediction, and its weights must
        match the recorded ``weights_sha256``.

    Raises:
        ModelNotFoundError: If there is no model at ``url``.
        ModelIntegrityError: If a file is missing or altered.
        IncompatibleModelError: If the running code cannot serve the model.
        WeightsNotAllowedError: If the manifest names backbone weights outside the store and
            ``$PADIM_WEIGHTS_ALLOW`` (:func:`padim.store.check_manifest_weights`).
    """
    manifest = read_manifest(url)
    config = check_servable(manifest)
    check_manifest_weights(config.weights, url)
    files = manifest.get("files") or {}
    if MODEL_FILE not in files:
        raise ModelIntegrityError(f"model manifest at {url} lists no {MODEL_FILE}")
    fs, root = fsspec.core.url_to_fs(url)
    with tempfile.TemporaryDirectory(prefix="padim-load-") as scratch:
        tensors = _load_tensors(_fetch_verified(fs, root, MODEL_FILE, files[MODEL_FILE], scratch))
        accumulator = None
        if with_statistics:
            if STATISTICS_FILE not in files:
                raise IncompatibleModelError(f"model at {url} was saved without its statistics; refit from scratch")
            state = _load_tensors(_fetch_verified(fs, root, STATISTICS_FILE, files[STATISTICS_FILE], scratch))
            accumulator = GaussianAccumulator.from_state_dict(state, device=device)
    images = read_training_images(url)
    spec = get_spec(config.backbone)
    d = resolve_channels(config, spec)
    h, w = grid_size(config, spec)
    mean, factor = tensors.get("mean"), tensors.get("factor")
    if factor is None and "factor_packed" in tensors:
        try:
            factor = unpack_lower(tensors["factor_packed"], d)
        except PadimError as exc:
            raise IncompatibleModelError(f"model tensors do not match its configuration: {exc}") from exc
    g = num_gaussians(config, (h, w))
    if mean is None or factor is None or mean.shape != (g, d) or factor.shape != (g, d, d):
        raise IncompatibleModelError(f"model tensors do not match its configuration (expected mean ({g}, {d}))")
    reference = tensors.get("reference")
    side = config.input_size
    if config.registration != "none" and (reference is None or tuple(reference.shape) != (side, side)):
        raise IncompatibleModelError(f"model with registration lacks its ({side}, {side}) reference image")
    if accumulator is not None and (accumulator.num_positions, accumulator.dim) != (h * w, d):
        raise IncompatibleModelError(
            f"model statistics have P={accumulator.num_positions}, d={accumulator.dim}; "
            f"its configuration needs P={h * w}, d={d}"
        )
    try:
        projector = EmbeddingProjector(
            spec.channels, indices=tensors.get("channel_indices"), projection=tensors.get("projection")
        )
    except ValueError as exc:
        raise IncompatibleModelError(f"model channel reduction cannot be used: {exc}") from exc
    if projector.out_channels != d:
        raise IncompatibleModelError(f"model channel reduction gives {projector.out_channels} channels, expected {d}")
    try:
        thresholds = Thresholds(**manifest["thresholds"]) if manifest.get("thresholds") else None
    except TypeError as exc:
        raise IncompatibleModelError(f"model thresholds cannot be read by this code: {exc}") from exc
    training = TrainingInfo(
        n_train=int(manifest.get("n_train", 0)),
        training_set_sha256=str(manifest.get("training_set_sha256", "")),
        training_images=images["fit"],
        calibration_images=images["calibration"],
    )
    model = PadimModel(
        config=config,
        projector=projector,
        mean=mean,
        factor=factor,
        weights_sha256=str(manifest.get("weights_sha256")),
        training=training,
        thresholds=thresholds,
        accumulator=accumulator,
        reference=reference if config.registration != "none" else None,
    )
    return model.to(device)


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
    if _is_local(fs):
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
        if _is_local(fs):
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


def read_training_images(url: str) -> dict[str, list[tuple[str, str]]]:
    """The images in a model version's statistics and its calibration images (checksum verified).

    Args:
        url: Model version directory.

    Returns:
        ``{"fit": [(uri, sha256), ...], "calibration": [...]}``.
    """
    manifest = read_manifest(url)
    entry = (manifest.get("files") or {}).get(TRAINING_FILE)
    if entry is None:
        return {"fit": [], "calibration": []}
    fs, root = fsspec.core.url_to_fs(url)
    with tempfile.TemporaryDirectory(prefix="padim-load-") as scratch:
        raw = json.loads(Path(_fetch_verified(fs, root, TRAINING_FILE, entry, scratch)).read_bytes())
    if not isinstance(raw, dict):
        raise IncompatibleModelError(f"{TRAINING_FILE} of the model at {url} has an unknown layout")
    return {key: [(str(u), str(h)) for u, h in raw.get(key, [])] for key in ("fit", "calibration")}
