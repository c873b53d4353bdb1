"""Where and how a job computes: the device, the batch size per device, the fast or plain path.

:func:`use_fast_path` is the one place the fast (stage maps) or plain (whole embedding)
implementation is chosen; the two are tested equal.
"""

from __future__ import annotations

import torch

from padim.core.config import PadimConfig
from padim.settings import CPU_BATCH_SIZE, GPU_BATCH_SIZES, ComputePath


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Pick the compute device: CUDA when present for ``"auto"``/``None``.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a device.

    Returns:
        The device.

    Raises:
        ValueError: If CUDA is requested but not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu")
    return resolved


def auto_batch_size(config: PadimConfig, device: str | torch.device | None) -> int:
    """A batch size that fills the device: :data:`~padim.settings.CPU_BATCH_SIZE` on a CPU; on a GPU,
    :data:`~padim.settings.GPU_BATCH_SIZES` scaled with its free memory.

    The GPU figures (at 224 x 224, for an 80 GB card) keep activations, the statistics and the
    scoring temporaries well inside memory; they scale linearly with free memory and inversely
    with the input area.

    Args:
        config: Model options (backbone, input size).
        device: Target device.

    Returns:
        Images per batch.
    """
    target = resolve_device(device)
    if target.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(target)
    base = GPU_BATCH_SIZES.get(config.backbone, 64)
    scale = (free / (70 * 1024**3)) * (224 * 224) / (config.input_size**2)
    return int(max(8, min(1024, base * scale)) // 8 * 8)


def use_fast_path(path: ComputePath, device: torch.device) -> bool:
    """Whether fitting and scoring read the stage maps directly (the one place this is decided).

    The fast path (:class:`~padim.core.cell_statistics.CellStatistics` for the statistics,
    :func:`banded_distances` for the distances) never builds the upsampled embedding; on a CPU it
    does a fifth of the statistics' arithmetic and keeps each band of the distances in cache. On a
    GPU the plain batched products are faster (H200, ResNet18: 21,300 against 18,000 images/s,
    BENCHMARKS.md). Both give the same numbers (tested); a layout the fast path cannot serve
    (a projection, stage maps that do not tile the grid) uses the plain one.

    Args:
        path: ``"auto"``, ``"fast"`` or ``"plain"``.
        device: Where the work runs.

    Returns:
        True for the fast path.
    """
    if path not in ("auto", "fast", "plain"):
        raise ValueError(f"path must be 'auto', 'fast' or 'plain', got {path!r}")
    return device.type == "cpu" if path == "auto" else path == "fast"
