"""Fit and score throughput against the backbone floor and the decode bound, in one process.

On the same files and the same batches, in one run (absolute figures drift on a shared machine;
ratios within a run do not):

* ``decode``: images/s of reading + decoding + resizing alone, with all cores (the loader's
  thread pool);
* ``floor``: images/s of the backbone alone, truncated after its last tap, on pre-decoded batches;
* ``fit`` / ``score``: images/s of the fit pass (embedding + statistics update) and of the score
  pass (embedding + Mahalanobis + anomaly map + summaries) on the same pre-decoded batches, as
  ratios to the floor;
* ``fit_e2e`` / ``score_e2e``: images/s through the pipeline from files (background decoding
  overlapping compute), as ratios to ``1 / (1/floor + 1/decode)``: decoding and the CNN share the
  same cores here, so that is the bound.

The timed passes alternate (floor, fit, score, then the two end-to-end passes) ``--repeats``
times and the best of each is kept: the machines are shared, and the best run is the one least
disturbed by other work.
Each result is one JSON line; the last line is a summary.

    python benchmarks/throughput.py --data ../shared/datasets/magnetic_tile/train/good
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from padim.config import PadimConfig
from padim.engine import fit_images, score_images, summarise_batch
from padim.images import iter_batches, list_images
from padim.model import PadimFitter, build_model
from padim.settings import CPU_BATCH_SIZE

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile" / "train" / "good"


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line."""
    print(json.dumps(record, sort_keys=True), flush=True)


def decode_all(uris: list[str], transform: Any, batch: int) -> tuple[list[torch.Tensor], float]:
    """Decode every file once into uint8 batches; return them and the decode-only images/s."""
    start = time.perf_counter()
    batches = [b.images for b in iter_batches(uris, transform, batch) if b.images is not None]
    seconds = time.perf_counter() - start
    return batches, sum(len(b) for b in batches) / seconds


def timed(step: Any, batches: list[torch.Tensor], finish: Any = None) -> float:
    """Images/s of ``step`` over all batches (then ``finish()``, when given, inside the timing)."""
    start = time.perf_counter()
    for images in batches:
        step(images)
    if finish is not None:
        finish()
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of images")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--channels", type=int, default=None, help="embedding channels (default: the backbone's)")
    parser.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    uris = list_images(args.data)[: args.limit]
    config = PadimConfig(backbone=args.backbone, weights=args.weights, channels=args.channels)
    fitter = PadimFitter(config, device="cpu")
    tag = {
        "backbone": args.backbone,
        "d": fitter.projector.out_channels,
        "batch": args.batch_size,
        "images": len(uris),
        "data": args.data,
        "threads": torch.get_num_threads(),
    }
    transform = fitter.preprocessor(normalize=False)
    iter_batches(uris[: args.batch_size], transform, args.batch_size)  # import/warm the loader
    batches, decode_rate = decode_all(uris, transform, args.batch_size)
    emit({**tag, "bench": "decode", "images_per_s": decode_rate})
    extractor = fitter.extractor
    network = extractor.network

    def floor(images: torch.Tensor) -> None:
        # The backbone alone, run exactly as the fit and score passes run it (device-side
        # normalisation, channels-last, CPU micro-batches), without the embedding and statistics.
        with torch.inference_mode():
            for _ in extractor.tap(images):
                pass

    def floor_one_call(images: torch.Tensor) -> None:
        # The same network on the whole batch in one call (what other implementations do).
        with torch.inference_mode():
            network(extractor.prepare(images))

    floor(batches[0])  # warm-up

    def fit(images: torch.Tensor) -> None:
        fitter.update(images)

    # A model to score with: fit once on all batches.
    timed(fit, batches, fitter.flush)
    model = build_model(fitter)
    model.extractor()

    def score(images: torch.Tensor) -> None:
        maps = model.anomaly_maps(images)
        summarise_batch(model, _records(len(images)), maps, "none")

    best: dict[str, float] = {"floor": 0.0, "fit": 0.0, "score": 0.0, "floor_one_call": 0.0}
    for repeat in range(args.repeats):
        for name, step in (("floor", floor), ("fit", fit), ("score", score), ("floor_one_call", floor_one_call)):
            value = timed(step, batches, fitter.flush if name == "fit" else None)
            best[name] = max(best[name], value)
            emit({**tag, "bench": name, "repeat": repeat, "images_per_s": value})
    bound = 1.0 / (1.0 / best["floor"] + 1.0 / decode_rate)
    fit_e2e = score_e2e = 0.0
    for repeat in range(args.repeats):
        start = time.perf_counter()
        fit_images(uris, config, batch_size=args.batch_size, device="cpu")
        value = len(uris) / (time.perf_counter() - start)
        fit_e2e = max(fit_e2e, value)
        emit({**tag, "bench": "fit_e2e", "repeat": repeat, "images_per_s": value})
        start = time.perf_counter()
        sum(1 for _ in score_images(model, uris, batch_size=args.batch_size, keep_maps="none"))
        value = len(uris) / (time.perf_counter() - start)
        score_e2e = max(score_e2e, value)
        emit({**tag, "bench": "score_e2e", "repeat": repeat, "images_per_s": value})
    emit(
        {
            **tag,
            "bench": "summary",
            "floor_images_per_s": best["floor"],
            "floor_one_call_images_per_s": best["floor_one_call"],
            "micro_batch": extractor.micro_batch,
            "decode_images_per_s": decode_rate,
            "fit_images_per_s": best["fit"],
            "score_images_per_s": best["score"],
            "fit_over_floor": best["fit"] / best["floor"],
            "score_over_floor": best["score"] / best["floor"],
            "e2e_bound_images_per_s": bound,
            "fit_e2e_images_per_s": fit_e2e,
            "score_e2e_images_per_s": score_e2e,
            "fit_e2e_over_bound": fit_e2e / bound,
            "score_e2e_over_bound": score_e2e / bound,
        }
    )
    return 0


def _records(n: int) -> list[Any]:
    """Placeholder image records for the summaries (sizes only)."""
    from padim.images import ImageRecord

    return [ImageRecord(uri=f"bench-{i}", sha256="0" * 64, width=224, height=224) for i in range(n)]


if __name__ == "__main__":
    raise SystemExit(main())
