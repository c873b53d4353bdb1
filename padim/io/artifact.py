"""The on-disk (or object-store) form of a model version: safetensors plus a JSON manifest.

A model version is one directory (any fsspec URL) holding:

* ``statistics.safetensors`` - the raw accumulator (``n``, ``mean``, and the lower triangle of the
  symmetric ``m2`` as ``m2_packed``, all float64), so that new normal images can be added later
  without re-extracting the old ones. It also determines the scoring Gaussians exactly:
  :func:`load_model` finalises it with :func:`padim.core.fitter.finalize_gaussians`, the function the
  fit uses, so the loaded model's means and factors are bit for bit the fitted model's (on the
  same kind of device);
* ``model.safetensors`` - the channel reduction (``channel_indices (d,)`` or ``projection (D, d)``)
  and, for registration, the gray ``reference (S, S)``. Only when the statistics are not stored
  (or do not reproduce the model's factor, e.g. a factor converted after the fit) does it also
  hold ``mean (G, d)`` and the lower-triangular whitening factor packed row by row as
  ``factor_packed (G, d (d + 1) / 2)`` (``G = P`` Gaussians, one per position; 1 or ``P + 1``
  with shared statistics, see :func:`padim.core.geometry.num_gaussians`). The manifest's
  ``factor_storage`` says which: ``"statistics"`` (derived) or ``"packed"`` (stored);
* ``training_images.json`` - ``{"fit": [[uri, sha256], ...], "calibration": [...]}``: the images
  in the statistics and the held-out images the thresholds were calibrated on;
* ``manifest.json`` - configuration, backbone and weights identity, taps, normalisation,
  thresholds, provenance, library version and the sha256 and size of every other file.

At the defaults (d = 176, 3136 positions) a version is 395.2 MB instead of the 592.8 MB of
``padim.model/1``, which stored the float32 mean and factor next to the statistics
(BENCHMARKS.md, "Bytes per model version"). Versions in that older form still load (their
stored factor is read).

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
from padim.core.backbones import get_spec
from padim.core.config import PadimConfig
from padim.core.covariance import pack_lower, unpack_lower
from padim.core.embedding import EmbeddingProjector
from padim.core.fitter import finalize_gaussians
from padim.core.geometry import grid_size, num_gaussians, resolve_channels
from padim.core.mahalanobis import whitening_from_accumulator
from padim.core.model import PadimModel, Thresholds, TrainingInfo
from padim.core.statistics import GaussianAccumulator, pool_positions
from padim.errors import IncompatibleModelError, ModelIntegrityError, ModelNotFoundError, PadimError
from padim.io.fsio import is_local_fs
from padim.io.weights_trust import check_manifest_weights

MODEL_FORMAT = "padim.model/2"


LEGACY_FORMATS = ("padim.model/1",)
"""Older formats this code still reads (``/1`` always stores the factor)."""


FACTOR_FROM_STATISTICS = "statistics"
"""``factor_storage`` of a version whose means and factors are derived from its statistics."""


FACTOR_PACKED = "packed"
"""``factor_storage`` of a version that stores ``mean`` and ``factor_packed`` in ``model.safetensors``."""


CHECK_POSITIONS = 64
"""Positions whose factor :func:`save_model` re-derives to check that the statistics reproduce it."""


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


def _sha256_stream(handle: Any) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: handle.read(_CHUNK), b""):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _model_tensors(model: PadimModel, with_factor: bool) -> dict[str, torch.Tensor]:
    tensors = {}
    if with_factor:
        tensors["mean"] = model.mean.detach().float().cpu().contiguous()
        tensors["factor_packed"] = pack_lower(model.factor.detach().cpu())
    if model.projector.indices is not None:
        tensors["channel_indices"] = model.projector.indices.cpu().contiguous()
    if model.projector.projection is not None:
        tensors["projection"] = model.projector.projection.cpu().contiguous()
    if model.reference is not None:
        tensors["reference"] = model.reference.detach().float().cpu().contiguous()
    return tensors


def statistics_reproduce_factor(model: PadimModel) -> bool:
    """Whether finalising ``model.accumulator`` gives back the model's means and factors.

    True for every float32 or float64 model :func:`padim.core.fitter.build_model` returns with its
    statistics; false when the accumulator changed after the fit or the factor was converted
    afterwards (:meth:`PadimModel.to_device` with a ``factor_dtype``). Checks every mean and the
    factors of the first :data:`CHECK_POSITIONS` positions (and the shared Gaussian), computed as
    :func:`padim.core.fitter.finalize_gaussians` computes them: a small fraction of a fit (with
    ``covariance="oas"``, which reads whole co-moment matrices, every factor: one more
    finalisation). Half-precision
    factors are always stored: one rounded from float32 after the fit differs from one rounded
    straight from float64 in rare elements that a sample would miss.

    Args:
        model: A fitted model with its statistics.

    Returns:
        True when the statistics can stand in for the stored factor.
    """
    accumulator, config = model.accumulator, model.config
    if accumulator is None or accumulator.n < 2:
        return False
    positions = accumulator.num_positions
    if tuple(model.mean.shape) != (num_gaussians(config, model.grid), accumulator.dim):
        return False
    device, dtype = accumulator.device, model.factor.dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    mean, factor = model.mean.detach().to(device), model.factor.detach()
    try:
        if config.covariance != "fixed":
            # OAS reads the whole co-moment matrix, and the stored one is the lower triangle
            # mirrored (the in-memory update rounds the upper one independently): check it all,
            # on the statistics as they will be read back (one more finalisation).
            stored = GaussianAccumulator.from_state_dict(accumulator.state_dict(packed=True), device=device)
            derived_mean, derived_factor = finalize_gaussians(stored, config, dtype)
            return torch.equal(mean, derived_mean) and torch.equal(factor.to(device), derived_factor)
        # Cholesky reads only the lower triangles, which the stored statistics keep bit for bit.
        if config.statistics in ("position", "both"):
            k = min(CHECK_POSITIONS, positions)
            head = GaussianAccumulator.from_state_dict(
                {"n": torch.tensor([accumulator.n]), "mean": accumulator.mean[:k], "m2": accumulator.m2[:k]},
                device=device,
            )
            expected = whitening_from_accumulator(head, config.eps, config.covariance, dtype=dtype)
            if not torch.equal(mean[:positions], accumulator.mean.float()):
                return False
            if not torch.equal(factor[:k].to(device), expected):
                return False
        if config.statistics in ("shared", "both"):
            pooled = pool_positions(accumulator)
            expected = whitening_from_accumulator(pooled, config.eps, config.covariance, dtype=dtype)
            if not torch.equal(mean[-1:], pooled.mean.float()) or not torch.equal(factor[-1:].to(device), expected):
                return False
    except (PadimError, ValueError, RuntimeError):
        return False
    return True


def build_manifest(
    model: PadimModel, files: dict[str, dict[str, Any]], factor_storage: str = FACTOR_PACKED
) -> dict[str, Any]:
    """The manifest of a model version.

    Args:
        model: The fitted model.
        files: ``{name: {"sha256": hex, "size": bytes}}`` of every tensor/data file.
        factor_storage: :data:`FACTOR_FROM_STATISTICS` or :data:`FACTOR_PACKED`.

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
        "factor_storage": factor_storage,
        "statistics_device": model.accumulator.device.type if factor_storage == FACTOR_FROM_STATISTICS else None,
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
    With the statistics, the means and factors are not written: :func:`load_model` derives them
    (unless the statistics do not reproduce them, :func:`statistics_reproduce_factor`).

    Args:
        model: The fitted model.
        url: Target directory; created if needed.
        keep_statistics: Also write the float64 accumulator (needed for incremental refits);
            without it the factor is stored.

    Returns:
        The manifest written.
    """
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    statistics = keep_statistics and model.accumulator is not None
    derived = statistics and statistics_reproduce_factor(model)
    factor_storage = FACTOR_FROM_STATISTICS if derived else FACTOR_PACKED
    payload: dict[str, dict[str, torch.Tensor] | bytes] = {MODEL_FILE: _model_tensors(model, with_factor=not derived)}
    if statistics and model.accumulator is not None:
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
    manifest = build_manifest(model, files, factor_storage)
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
    if manifest.get("format") not in (MODEL_FORMAT, *LEGACY_FORMATS):
        raise IncompatibleModelError(
            f"model format {manifest.get('format')!r} cannot be served by padim {padim.__version__} "
            f"(reads {', '.join((MODEL_FORMAT, *LEGACY_FORMATS))})"
        )
    if manifest.get("factor_storage", FACTOR_PACKED) not in (FACTOR_PACKED, FACTOR_FROM_STATISTICS):
        raise IncompatibleModelError(f"model factor storage {manifest.get('factor_storage')!r} is unknown to this code")
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
    if is_local_fs(fs):
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


def _factor_dtype(manifest: dict[str, Any]) -> torch.dtype:
    """The factor's dtype recorded in a manifest (float32 when absent)."""
    name = manifest.get("factor_dtype") or "float32"
    dtype = getattr(torch, str(name), None) if str(name).isidentifier() else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise IncompatibleModelError(f"model factor dtype {name!r} is unknown to this code")
    return dtype


def load_model(url: str, device: str | torch.device = "cpu", with_statistics: bool = False) -> PadimModel:
    """Load and verify a model version.

    Args:
        url: Model version directory (local or fsspec URL).
        device: Device for the model's tensors.
        with_statistics: Also load the float64 accumulator (for incremental refits).

    Returns:
        The model. Its backbone is loaded lazily on first prediction, and its weights must
        match the recorded ``weights_sha256``. A version whose ``factor_storage`` is
        ``"statistics"`` gets its means and factors from :func:`padim.core.fitter.finalize_gaussians`
        of its verified statistics, on ``device`` (bit for bit those of the fit when that ran on
        the same kind of device); its statistics are then read even without ``with_statistics``.

    Raises:
        ModelNotFoundError: If there is no model at ``url``.
        ModelIntegrityError: If a file is missing or altered.
        IncompatibleModelError: If the running code cannot serve the model.
        WeightsNotAllowedError: If the manifest names backbone weights outside the store and
            ``$PADIM_WEIGHTS_ALLOW`` (:func:`padim.io.weights_trust.check_manifest_weights`).
    """
    manifest = read_manifest(url)
    config = check_servable(manifest)
    check_manifest_weights(config.weights, url)
    files = manifest.get("files") or {}
    if MODEL_FILE not in files:
        raise ModelIntegrityError(f"model manifest at {url} lists no {MODEL_FILE}")
    derived = manifest.get("format") == MODEL_FORMAT and manifest.get("factor_storage") == FACTOR_FROM_STATISTICS
    if derived and STATISTICS_FILE not in files:
        raise ModelIntegrityError(f"model manifest at {url} lists no {STATISTICS_FILE}, which holds its Gaussians")
    spec = get_spec(config.backbone)
    d = resolve_channels(config, spec)
    h, w = grid_size(config, spec)
    g = num_gaussians(config, (h, w))
    fs, root = fsspec.core.url_to_fs(url)
    with tempfile.TemporaryDirectory(prefix="padim-load-") as scratch:
        # Every file is verified before any of them is parsed.
        model_path = _fetch_verified(fs, root, MODEL_FILE, files[MODEL_FILE], scratch)
        statistics_path = None
        if with_statistics or derived:
            if STATISTICS_FILE not in files:
                raise IncompatibleModelError(f"model at {url} was saved without its statistics; refit from scratch")
            statistics_path = _fetch_verified(fs, root, STATISTICS_FILE, files[STATISTICS_FILE], scratch)
        tensors = _load_tensors(model_path)
        accumulator = None
        if statistics_path is not None:
            try:
                accumulator = GaussianAccumulator.from_state_dict(_load_tensors(statistics_path), device=device)
            except PadimError as exc:
                raise IncompatibleModelError(f"model statistics cannot be read by this code: {exc}") from exc
    if accumulator is not None and (accumulator.num_positions, accumulator.dim) != (h * w, d):
        raise IncompatibleModelError(
            f"model tensors do not match its configuration: its statistics have P={accumulator.num_positions}, "
            f"d={accumulator.dim}; its configuration needs P={h * w}, d={d}"
        )
    images = read_training_images(url)
    reference = tensors.get("reference")
    side = config.input_size
    if config.registration != "none" and (reference is None or tuple(reference.shape) != (side, side)):
        raise IncompatibleModelError(f"model with registration lacks its ({side}, {side}) reference image")
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
    if derived and accumulator is not None:
        factor_dtype = _factor_dtype(manifest)
        try:  # the function the fit finalises its statistics with: the same bits
            mean, factor = finalize_gaussians(accumulator, config, factor_dtype)
        except (PadimError, ValueError) as exc:
            raise IncompatibleModelError(f"model statistics do not give its Gaussians: {exc}") from exc
    else:
        mean, factor = tensors.get("mean"), tensors.get("factor")
        if factor is None and "factor_packed" in tensors:
            try:
                factor = unpack_lower(tensors["factor_packed"], d)
            except PadimError as exc:
                raise IncompatibleModelError(f"model tensors do not match its configuration: {exc}") from exc
    if mean is None or factor is None or mean.shape != (g, d) or factor.shape != (g, d, d):
        raise IncompatibleModelError(f"model tensors do not match its configuration (expected mean ({g}, {d}))")
    if not with_statistics:
        accumulator = None
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
