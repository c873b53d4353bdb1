"""The promotion gate over three automatic retrains, through the `padim` command (issue 16).

On MVTec AD bottle at the defaults: ``padim train`` on the first 60 images of ``train/good`` (sorted
by name), the first 8 images of ``test/broken_large`` as the product's reference defects, then three
``padim retrain`` runs on the next batches of 30 images each, with the gate on. Prints one row per
version (image threshold, change against the version in use, pool size, false alarms on the pool
out of sample and in sample, reference defects flagged, outcome) as a markdown table, and appends
the figures to a JSON-lines file.

Usage::

    nice python benchmarks/promotion_gate.py --out benchmarks/results/promotion-gate.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO.parent / "shared" / "datasets" / "mvtec_bottle"
PRODUCT = "bottle"
FIRST, BATCH, BATCHES, DEFECTS = 60, 30, 3, 8


def padim(*args: str) -> dict[str, Any]:
    """Run ``padim ARGS --json`` in a fresh process and parse its output."""
    command = [sys.executable, "-m", "padim_cli.main", *args, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def copy_images(sources: list[Path], folder: Path) -> str:
    """Copy images into a fresh folder and return its path."""
    folder.mkdir(parents=True)
    for source in sources:
        shutil.copy(source, folder / source.name)
    return str(folder)


def row(name: str, threshold: float, gate: dict[str, Any] | None, in_use: bool) -> dict[str, Any]:
    """One version's figures."""
    figures: dict[str, Any] = {"version": name, "image_threshold": threshold, "in_use": in_use}
    if gate is not None:
        figures.update(
            change=threshold / gate["in_use_threshold"] - 1.0,
            pool_images=gate["pool_images"],
            pool_false_alarms=gate["pool_false_alarms"],
            pool_false_alarms_in_sample=gate.get("pool_false_alarms_in_sample"),
            max_pool_fpr=gate["max_pool_fpr"],
            defects_flagged=gate["defects"] - len(gate["defects_missed"]),
            defects=gate["defects"],
            reasons=gate["reasons"],
        )
    return figures


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| version | image threshold | against the version in use | pool | false alarms out of sample "
        "(in sample), bound | reference defects flagged | outcome |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "pool_images" not in r:
            lines.append(f"| {r['version']} | {r['image_threshold']:.1f} | - | - | - | - | in use |")
            continue
        outcome = "in use" if r["in_use"] else "**rejected**: stays a candidate (" + "; ".join(r["reasons"]) + ")"
        lines.append(
            f"| {r['version']} | {r['image_threshold']:.1f} | {r['change']:+.1%} | {r['pool_images']} | "
            f"{r['pool_false_alarms']} ({r['pool_false_alarms_in_sample']}), at most "
            f"{r['max_pool_fpr']:.1%} | {r['defects_flagged']} of {r['defects']} | {outcome} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--work", type=Path, default=Path("/tmp/padim-gate-benchmark"))
    parser.add_argument("--out", type=Path, default=None, help="Append the figures to this JSON-lines file.")
    args = parser.parse_args()
    good = sorted((args.dataset / "train" / "good").glob("*.png"))
    defects = sorted((args.dataset / "test" / "broken_large").glob("*.png"))[:DEFECTS]
    if len(good) < FIRST + BATCH * BATCHES or len(defects) < DEFECTS:
        raise SystemExit(f"{args.dataset} has too few images (needs MVTec AD bottle)")
    shutil.rmtree(args.work, ignore_errors=True)
    store = str(args.work / "store")
    common = ["--product", PRODUCT, "--store", store]
    start = time.perf_counter()
    trained = padim("train", *common, "--normal", copy_images(good[:FIRST], args.work / "train"), "--device", "cpu")
    from padim.io.store import ModelStore

    manifest = ModelStore(store).read_manifest(PRODUCT, trained["version"])
    padim_configure = [sys.executable, "-m", "padim_cli.main", "configure", *common]
    subprocess.run(
        [*padim_configure, "--reference-defects", copy_images(defects, args.work / "defects")],
        check=True,
        capture_output=True,
    )
    rows = [row("train", manifest["thresholds"]["image"], None, True)]
    for k in range(BATCHES):
        batch = good[FIRST + k * BATCH : FIRST + (k + 1) * BATCH]
        result = padim("retrain", *common, "--normal", copy_images(batch, args.work / f"batch{k + 1}"))
        gate = result["gate"]
        rows.append(row(f"retrain {k + 1}", gate["candidate_threshold"], gate, result["status"] == "published"))
    table = markdown(rows)
    print(table)
    if args.out is not None:
        record = {"measured_at": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.perf_counter() - start, "rows": rows}
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
