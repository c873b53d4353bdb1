"""What the accuracy benchmark measures: data sets, variants, perturbations and reference figures.

Part of the accuracy benchmark (``benchmarks/accuracy.py`` runs it, ``benchmarks/accuracy_markdown.py``
renders its results): the data set names, the paper protocol (:data:`PAPER`), the variants
(:data:`VARIANTS`, with :func:`variant_overrides`, :func:`variant_config` and
:func:`unsupported_reason`), the perturbation names of the robustness table, the anomalib anchors,
the calibration study's target rates and the key of a result in the store.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # siblings beside this file, however imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))

DATASETS = ("mvtec_bottle", "magnetic_tile")
ALIGNED = "aligned"
"""The perturbation name of the data set itself."""

PAPER: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "channels": 100,
    "channel_selection": "random",
    "seed": 0,
    "image_size": 256,
    "crop_size": 224,
    "resize_mode": "square",
    "eps": 0.01,
    "covariance": "fixed",
    "blur_sigma": 4.0,
}
"""The paper protocol with the default backbone (anomalib's measured configuration)."""

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (description, PadimConfig overrides). Names starting with "default" build on the shipped
    # defaults (`PadimConfig(**overrides)`), the others on the paper protocol (`PAPER`). A remedy
    # whose option PadimConfig does not know yet is reported as unsupported, not run, e.g.
    # "default_shared": ("one Gaussian shared by all positions", {"statistics": "shared"}),
    "default": ("the shipped defaults (`PadimConfig()`: every channel, 224 x 224, no crop)", {}),
    "default_bf16": ("the shipped defaults with the OpenVINO backbone in bfloat16 (`--precision bf16`)", {}),
    # Remedies for parts that are not aligned (issue 18), each on the shipped defaults:
    "default_shared": ("one Gaussian shared by all patch positions (`statistics='shared'`)", {"statistics": "shared"}),
    "default_tolerance1": ("tolerant scoring, radius 1 patch (`tolerance=1`)", {"tolerance": 1}),
    "default_tolerance2": ("tolerant scoring, radius 2 patches (`tolerance=2`)", {"tolerance": 2}),
    "default_neighbourhood3": ("3 x 3 locally aware patch features (`neighbourhood=3`)", {"neighbourhood": 3}),
    "default_registration": (
        "phase-correlation registration to a reference (`registration='phase'`)",
        {"registration": "phase"},
    ),
    "default_augment4": ("4 augmented copies per normal image (shift 10 %, rotation 15 deg)", {"augment_copies": 4}),
    "default_augment4_any": (
        "4 augmented copies per normal image, any rotation (`augment_rotation=180`)",
        {"augment_copies": 4, "augment_rotation": 180.0},
    ),
    "default_shared_neighbourhood3": (
        "shared Gaussian over 3 x 3 locally aware features",
        {"statistics": "shared", "neighbourhood": 3},
    ),
    "default_tolerance2_neighbourhood3": (
        "tolerant scoring (radius 2) over 3 x 3 locally aware features",
        {"tolerance": 2, "neighbourhood": 3},
    ),
    "paper": ("paper protocol: 100 random channels, S + 0.01 I, resize 256 + crop 224", {}),
    "semi_orthogonal": (
        "100-dim semi-orthogonal projection (Kim et al. 2021)",
        {"channel_selection": "semi_orthogonal"},
    ),
    "oas": ("OAS shrinkage of each covariance, then + 0.01 I", {"covariance": "oas"}),
    "shorter_side": ("aspect-preserving resize (shorter side 256), crop 224", {"resize_mode": "shorter_side"}),
    "all_channels": ("all 176 channels", {"channel_selection": "all", "channels": None}),
    "no_crop": (
        "100 random channels, resize to 224 x 224 without crop (the whole image is inspected)",
        {"image_size": 224, "crop_size": None},
    ),
    "all_no_crop": (
        "all 176 channels, resize to 224 x 224 without crop (the whole image is inspected)",
        {"channel_selection": "all", "channels": None, "image_size": 224, "crop_size": None},
    ),
}

VARIANT_SETTINGS: dict[str, dict[str, Any]] = {"default_bf16": {"precision": "bf16"}}
"""Job settings that differ from the shipped ones (``TrainSettings``), per variant."""

ANCHORS: dict[str, dict[str, float]] = {
    "mvtec_bottle": {"image_auroc": 0.9976, "pixel_auroc": 0.9772, "aupro": 0.9075},
    "magnetic_tile": {"image_auroc": 0.9164, "pixel_auroc": 0.7733, "aupro": 0.7211},
}
"""anomalib 2.7.0 PaDiM, same backbone, weights, channels and protocol (shared/benchmarks/anchors.md)."""

IMAGE_FPR_TARGETS = (0.01, 0.05)
PIXEL_FPR_TARGETS = (0.01, 0.001, 0.0001)


def variant_overrides(name: str) -> dict[str, Any]:
    """The :class:`PadimConfig` fields of a variant: its overrides on top of its base.

    Names starting with ``default`` build on ``PadimConfig()`` (``default`` is ``PadimConfig()``
    itself), the others on :data:`PAPER`.

    Raises:
        ValueError: If the variant is unknown.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    _, overrides = VARIANTS[name]
    return dict(overrides) if name.startswith("default") else {**PAPER, **overrides}


def variant_config(name: str) -> Any:
    """The :class:`PadimConfig` of a variant (see :func:`variant_overrides`)."""
    from padim.core.config import PadimConfig

    return PadimConfig(**variant_overrides(name))


def unsupported_reason(variant: str) -> str | None:
    """Why a variant cannot run on this machine or with this code (``None`` when it can).

    A variant whose configuration keys :class:`PadimConfig` does not know (a remedy not
    implemented yet), or whose values it rejects, is unsupported.
    """
    from pydantic import ValidationError

    from padim.core.config import PadimConfig

    overrides = variant_overrides(variant)
    unknown = sorted(set(overrides) - set(PadimConfig.model_fields))
    if unknown:
        return f"PadimConfig has no option {', '.join(unknown)} yet"
    try:
        PadimConfig(**overrides)
    except ValidationError as exc:
        return f"PadimConfig rejects the configuration: {exc.errors()[0].get('msg', exc)}"
    if VARIANT_SETTINGS.get(variant, {}).get("precision") == "bf16":
        import openvino

        capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            return f"this CPU has no bfloat16 support (OpenVINO reports {list(capabilities)})"
    return None


def perturbation_names() -> tuple[str, ...]:
    """``aligned`` and the names of the perturbations, in table order."""
    from perturbation import PERTURBATIONS

    return (ALIGNED, *PERTURBATIONS)


def result_key(spec: str, variant: str) -> str:
    """Key of a result in the store: ``"<spec>/<variant>"`` (``mvtec_bottle@shifted/default``)."""
    return f"{spec}/{variant}"
