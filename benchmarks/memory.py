"""Peak RSS of a fit against the number of training images (each size in a fresh process).

A fit here is what ``padim train`` does per shard plus the finalisation: background loading,
embedding, the streaming float64 statistics, and the whitening factor. The image lists are the
first N images of the folder; sizes above the folder's count repeat it (``3048`` = the 762
magnetic-tile images four times), as in the anomalib reference figures.

    python benchmarks/memory.py --sizes 190 381 762 3048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile" / "train" / "good"


def fit_once(data: str, size: int, backbone: str, weights: str | None, channels: int, batch: int) -> dict[str, float]:
    """Fit on ``size`` images in this process and report its peak RSS."""
    from padim.core.backbones import get_backbone
    from padim.core.config import PadimConfig
    from padim.core.fitter import build_model
    from padim.io.listing import list_images
    from padim.jobs.engine import fit_images

    uris = list_images(data)
    uris = (uris * (size // len(uris) + 1))[:size]
    config = PadimConfig(backbone=backbone, weights=weights, channels=channels)
    start = time.perf_counter()
    result = fit_images(uris, config, batch_size=batch, device="cpu")
    weights_sha256 = get_backbone(backbone, weights, "cpu").weights_sha256
    build_model(config, result.accumulator, weights_sha256=weights_sha256)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"images": size, "fitted": result.accumulator.n, "seconds": seconds, "peak_rss_mb": peak_mb}


def main(argv: list[str] | None = None) -> int:
    """Run each size in a child process and print one JSON line per size, then a summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--sizes", type=int, nargs="+", default=[190, 381, 762, 3048])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        result = fit_once(args.data, args.child, args.backbone, args.weights, args.channels, args.batch_size)
        print(json.dumps(result))
        return 0
    results = []
    for size in args.sizes:
        command = [
            sys.executable,
            __file__,
            "--child",
            str(size),
            "--data",
            args.data,
            "--backbone",
            args.backbone,
            "--channels",
            str(args.channels),
            "--batch-size",
            str(args.batch_size),
        ]
        if args.weights:
            command += ["--weights", args.weights]
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        record = {
            "bench": "fit_peak_rss",
            "backbone": args.backbone,
            "d": args.channels,
            **json.loads(child.stdout.strip().splitlines()[-1]),
        }
        results.append(record)
        print(json.dumps(record), flush=True)
    by_size = {r["images"]: r["peak_rss_mb"] for r in results}
    summary: dict[str, object] = {"bench": "summary", "peak_rss_mb": by_size}
    if 190 in by_size and 762 in by_size:
        summary["ratio_762_over_190"] = by_size[762] / by_size[190]
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
