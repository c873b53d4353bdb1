"""What the perturbation costs plain PaDiM, part by part, and what perfect registration would win back.

The robustness table (``benchmarks/accuracy.py --robustness``) perturbs every image at once by a
shift, a rotation and a brightness/contrast change. This benchmark takes the perturbation apart on
one data set, evaluating plain PaDiM (``PadimConfig()``, the ``default`` variant) through the same
worker as the accuracy benchmark:

* ``shift_only``, ``rotation_only``, ``photometric_only``: the perturbation with the other parts
  off (same seed, so the same draws);
* ``inverse``: the perturbed copy with each image's *recorded* transform inverted (the manifest
  of the copy holds it) - registration that knows the true pose, an upper bound of any
  registration. What it cannot give back is what the reflected border filled in.

Copies are cached like the perturbed ones (``$PADIM_CACHE/perturbed``). Results are appended to
a JSON-lines file and printed as a markdown table.

Usage::

    nice python benchmarks/misalignment_anatomy.py --dataset magnetic_tile --perturbation shifted \
        --out benchmarks/results/misalignment-anatomy.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

if str(Path(__file__).resolve().parent) not in sys.path:  # siblings beside this file, however imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import run_subprocess
from perturbation import (
    MANIFEST,
    Draw,
    _rotation,
    cache_root,
    ensure_perturbed,
    get_perturbation,
    perturb_image,
    perturb_mask,
    read_manifest,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS_DIR = REPO.parent / "shared" / "datasets"
PARTS = ("shift_only", "rotation_only", "photometric_only", "inverse")


def part_perturbation(perturbation: str, part: str) -> Any:
    """The perturbation with only one of its parts on (``*_only`` parts).

    Args:
        perturbation: Name of the full perturbation.
        part: ``shift_only``, ``rotation_only`` or ``photometric_only``.

    Returns:
        A :class:`perturbation.Perturbation` named ``<perturbation>_<part>``.
    """
    spec = get_perturbation(perturbation)
    keep = {
        "shift_only": {"max_angle": 0.0, "any_angle": False, "max_photometric": 0.0},
        "rotation_only": {"max_shift": 0.0, "max_photometric": 0.0},
        "photometric_only": {"max_shift": 0.0, "max_angle": 0.0, "any_angle": False},
    }[part]
    return dataclasses.replace(spec, name=f"{perturbation}_{part}", **keep)


def inverse_draw(record: dict[str, Any]) -> Draw:
    """The transform that undoes a recorded one (geometry only).

    ``p_out = R (p_in - c) + c + t`` is undone by ``p_in = R^T (p_out - c) + c - R^T t``: a rotation
    by ``-angle`` about the centre followed by the shift ``-R^T t``.
    """
    back = -_rotation(record["angle"]).T @ np.array([record["dx"], record["dy"]])
    return Draw(dx=float(back[0]), dy=float(back[1]), angle=-record["angle"], brightness=1.0, contrast=1.0)


def ensure_inverse(perturbed: Path) -> Path:
    """The copy of a perturbed data set with every image and mask moved back to its source pose.

    Written beside the perturbed copy (``<name>-inverse``), atomically, and reused when present.
    """
    final = perturbed.parent / f"{perturbed.name}-inverse"
    if read_manifest(final) is not None:
        return final
    manifest = read_manifest(perturbed)
    if manifest is None:
        raise SystemExit(f"{perturbed} has no manifest")
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=perturbed.parent))
    try:
        for relative, record in manifest["files"].items():
            draw = inverse_draw(record)
            target = building / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            perturb_image(Image.open(perturbed / relative), draw).save(target, compress_level=1)
            if record.get("mask"):
                mask_target = building / record["mask"]
                mask_target.parent.mkdir(parents=True, exist_ok=True)
                perturb_mask(Image.open(perturbed / record["mask"]), draw).save(mask_target)
        (building / MANIFEST).write_text(
            json.dumps({"inverse_of": str(perturbed), "generator_version": manifest["generator_version"]}) + "\n",
            encoding="utf-8",
        )
        if not final.exists():
            building.rename(final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def build_copy(source: Path, perturbation: str, part: str, seed: int) -> Path:
    """The folder evaluated for one part."""
    if part == "inverse":
        return ensure_inverse(ensure_perturbed(source, perturbation, seed))
    return ensure_perturbed(source, part_perturbation(perturbation, part), seed, cache_root())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets-dir", type=Path, default=DEFAULT_DATASETS_DIR)
    parser.add_argument("--dataset", default="magnetic_tile")
    parser.add_argument("--perturbation", default="shifted")
    parser.add_argument("--part", action="append", choices=PARTS, help=f"repeatable; default: {list(PARTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "misalignment-anatomy.jsonl")
    args = parser.parse_args(argv)
    source = args.datasets_dir / args.dataset
    rows = []
    for part in args.part or PARTS:
        folder = build_copy(source, args.perturbation, part, args.seed)
        result = run_subprocess(folder, "default", args.batch_size)
        record = {
            "dataset": args.dataset,
            "perturbation": args.perturbation,
            "part": part,
            "seed": args.seed,
            **{key: result[key] for key in ("image_auroc", "pixel_auroc", "aupro", "measured_at", "machine")},
        }
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        rows.append(record)
        print(json.dumps(record), flush=True)
    print("\n| data set | perturbation | part | image AUROC | pixel AUROC | AUPRO 0.3 |\n|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['dataset']} | {row['perturbation']} | {row['part']} | {row['image_auroc']:.4f} | "
            f"{row['pixel_auroc']:.4f} | {row['aupro']:.4f} |"
        )
    print(f"\nmeasured {time.strftime('%Y-%m-%d %H:%M')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
