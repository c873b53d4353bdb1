"""Fit and score throughput against the backbone floor and the decode bound, in one process.

On the same files and the same batches, in one run (absolute figures drift on a shared machine;
ratios within a run do not):

* ``decode``: images/s of reading + decoding + resizing alone, with all cores (the loader's
  thread pool);
* ``floor_torch`` / ``floor_openvino``: images/s of the backbone alone (truncated after its last
  tap, micro-batches as the extractor runs it) on pre-decoded batches, on each runtime; ``floor``
  is the faster of the two: the fastest exact way this machine runs the network;
  ``floor_torch_unfolded``: torch without the batch norms folded into the convolutions;
* ``fit`` / ``score``: images/s of the fit pass (features + statistics update) and of the score
  pass (features + Mahalanobis + anomaly map + summaries) on the same pre-decoded batches, on the
  chosen runtime (``--runtime``, default ``auto``: what ships), as ratios to the floor;
* ``stages``: seconds per image of each stage of those passes (network, channel selection,
  statistics, distances, anomaly map, summaries);
* ``fit_e2e`` / ``score_e2e``: images/s of :func:`padim.jobs.engine.fit_images` /
  :func:`padim.jobs.engine.score_images` from files (background decoding overlapping compute), as
  ratios to the floor and to ``1 / (1/floor + 1/decode)`` (decoding and the CNN share the cores);
* with ``--evaluate DATASET``: ``padim evaluate``'s own fit and score images/s
  (:func:`padim.evaluation.run.run_evaluation` with every default: fit includes calibration and both
  finalisations) against the same floor.

The timed passes alternate ``--repeats`` times and the best of each is kept: the machines are
shared, and the best run is the one least disturbed by other work. Each result is one JSON line;
the last line is a summary.

    python benchmarks/throughput.py --evaluate ../shared/datasets/magnetic_tile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from padim.core.backbones import get_backbone, openvino_available
from padim.core.config import PadimConfig
from padim.core.fitter import PadimFitter, build_model
from padim.io.listing import list_images
from padim.io.loading import iter_batches
from padim.jobs.engine import fit_images, score_images, summarise_batch
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


def best_of(repeats: int, measure: Any) -> float:
    """The largest of ``repeats`` measurements."""
    return max(measure() for _ in range(repeats))


def network_floor(backbone: Any, batches: list[torch.Tensor], repeats: int) -> float:
    """Images/s of a backbone alone, run in the extractor's micro-batches (channels-last input)."""
    from padim.core.features import FeatureExtractor
    from padim.core.geometry import new_projector

    extractor = FeatureExtractor(backbone, new_projector(PadimConfig(backbone=backbone.spec.name)))

    def floor(images: torch.Tensor) -> None:
        with torch.inference_mode():
            for _ in extractor.tap(images):
                pass

    floor(batches[0])  # warm-up (and OpenVINO's compilation)
    return best_of(repeats, lambda: timed(floor, batches))


def stage_seconds(fitter: PadimFitter, model: Any, batches: list[torch.Tensor]) -> dict[str, float]:
    """Seconds per image of each stage of the fit and score passes (one pass each, after warm-up)."""
    n = sum(len(b) for b in batches)
    extractor = model.extractor()
    totals = dict.fromkeys(("network", "selection", "statistics", "distances", "anomaly_map", "summaries"), 0.0)
    with torch.inference_mode():
        for images in batches:
            start = time.perf_counter()
            for _ in extractor.tap(images):
                pass
            network = time.perf_counter() - start
            start = time.perf_counter()
            features = extractor.extract(images)
            totals["network"] += network
            totals["selection"] += max(0.0, time.perf_counter() - start - network)
            start = time.perf_counter()
            fitter.update(features)  # held, then folded ~128 images at a time
            totals["statistics"] += time.perf_counter() - start
            start = time.perf_counter()
            distances = model.distances(features)
            totals["distances"] += time.perf_counter() - start
            start = time.perf_counter()
            maps = model.anomaly_map(distances)
            totals["anomaly_map"] += time.perf_counter() - start
            start = time.perf_counter()
            summarise_batch(model, _records(len(images)), maps, "none")
            totals["summaries"] += time.perf_counter() - start
        start = time.perf_counter()
        fitter.flush()
        totals["statistics"] += time.perf_counter() - start
    return {k: v / n for k, v in totals.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of images")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--channels", type=int, default=None, help="embedding channels (default: the backbone's)")
    parser.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE)
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"])
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--evaluate", default=None, metavar="DATASET", help="also time padim evaluate on it")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    uris = list_images(args.data)[: args.limit]
    config = PadimConfig(backbone=args.backbone, weights=args.weights, channels=args.channels)
    execution = {"runtime": args.runtime, "precision": args.precision}
    fitter = PadimFitter(config, device="cpu", **execution)
    tag = {
        "backbone": args.backbone,
        "d": fitter.projector.out_channels,
        "batch": args.batch_size,
        "images": len(uris),
        "data": args.data,
        "threads": torch.get_num_threads(),
        "runtime": fitter.backbone.runtime,
        "precision": args.precision,
    }
    transform = fitter.preprocessor(normalize=False)
    iter_batches(uris[: args.batch_size], transform, args.batch_size)  # import/warm the loader
    batches, decode_rate = decode_all(uris, transform, args.batch_size)
    emit({**tag, "bench": "decode", "images_per_s": decode_rate})

    torch_backbone = get_backbone(args.backbone, args.weights, "cpu", "torch")
    floors = {
        "torch_unfolded": network_floor(dataclasses.replace(torch_backbone, runner=None), batches, args.repeats),
        "torch": network_floor(torch_backbone, batches, args.repeats),
    }
    if openvino_available():
        openvino = get_backbone(args.backbone, args.weights, "cpu", "openvino", "f32")
        floors["openvino"] = network_floor(openvino, batches, args.repeats)
    for name, value in floors.items():
        emit({**tag, "bench": f"floor_{name}", "images_per_s": value})
    floor = max(floors.values())

    def fit(images: torch.Tensor) -> None:
        fitter.update(images)

    timed(fit, batches, fitter.flush)  # a model to score with: fit once on all batches
    model = build_model(fitter, **execution)
    model.extractor()

    def score(images: torch.Tensor) -> None:
        maps = model.anomaly_maps(images)
        summarise_batch(model, _records(len(images)), maps, "none")

    best: dict[str, float] = {"fit": 0.0, "score": 0.0, "fit_e2e": 0.0, "score_e2e": 0.0}
    for repeat in range(args.repeats):
        for name, step in (("fit", fit), ("score", score)):
            value = timed(step, batches, fitter.flush if name == "fit" else None)
            best[name] = max(best[name], value)
            emit({**tag, "bench": name, "repeat": repeat, "images_per_s": value})
        start = time.perf_counter()
        fit_images(uris, config, batch_size=args.batch_size, device="cpu", **execution)
        best["fit_e2e"] = max(best["fit_e2e"], len(uris) / (time.perf_counter() - start))
        start = time.perf_counter()
        sum(1 for _ in score_images(model, uris, batch_size=args.batch_size, keep_maps="none"))
        best["score_e2e"] = max(best["score_e2e"], len(uris) / (time.perf_counter() - start))
        emit({**tag, "bench": "e2e", "repeat": repeat, "fit": best["fit_e2e"], "score": best["score_e2e"]})
    stages = stage_seconds(PadimFitter(config, device="cpu", **execution), model, batches)
    emit({**tag, "bench": "stages", "seconds_per_image": stages})
    bound = 1.0 / (1.0 / floor + 1.0 / decode_rate)
    summary: dict[str, Any] = {
        **tag,
        "bench": "summary",
        "floor_images_per_s": floor,
        **{f"floor_{name}_images_per_s": value for name, value in floors.items()},
        "micro_batch": model.extractor().micro_batch,
        "decode_images_per_s": decode_rate,
        "e2e_bound_images_per_s": bound,
        **{f"{name}_images_per_s": value for name, value in best.items()},
        **{f"{name}_over_floor": value / floor for name, value in best.items()},
        "fit_e2e_over_bound": best["fit_e2e"] / bound,
        "score_e2e_over_bound": best["score_e2e"] / bound,
        "stage_ms_per_image": {k: 1000 * v for k, v in stages.items()},
    }
    if args.evaluate:
        from padim.evaluation.results import summarize
        from padim.evaluation.run import run_evaluation
        from padim.settings import TrainSettings

        result = summarize(run_evaluation(args.evaluate, PadimConfig(), TrainSettings(**execution)))
        summary.update(
            evaluate_dataset=args.evaluate,
            evaluate_fit_images_per_s=result.fit_images_per_s,
            evaluate_score_images_per_s=result.score_images_per_s,
            evaluate_fit_over_floor=result.fit_images_per_s / floor,
            evaluate_score_over_floor=result.score_images_per_s / floor,
            evaluate_image_auroc=result.image_auroc,
        )
    emit(summary)
    return 0


def _records(n: int) -> list[Any]:
    """Placeholder image records for the summaries (sizes only)."""
    from padim.io.loading import ImageRecord

    return [ImageRecord(uri=f"bench-{i}", sha256="0" * 64, width=224, height=224) for i in range(n)]


if __name__ == "__main__":
    sys.exit(main())
