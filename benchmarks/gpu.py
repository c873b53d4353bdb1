"""GPU throughput and memory of PaDiM fit and score: one prepared script for a lent GPU machine.

For ResNet18 (d = 100), WideResNet50 (d = 550) (random weights: throughput does not depend on
them) and the default EfficientNet-Lite0 (d = 100), at 224 x 224, it measures in one process:

* the floor: the truncated backbone alone on the same device-resident batches;
* fit: embedding + streaming float64 statistics update;
* score: embedding + Mahalanobis (whitening factor) + anomaly map + image score, on the device,
  and with the maps copied back to the host;
* the same score with reduced precision (fp16 autocast backbone, fp16 factor) and how far the
  image scores move (relative);
* peak GPU memory of each phase;
* on files: decode-only images/s (all cores), and end-to-end fit and score through the pipeline
  (background decoding threads, pinned memory, non-blocking copies) on generated JPEGs.

Every result is one JSON line on stdout (and in ``--out``). Usage::

    python benchmarks/gpu.py --out results.jsonl            # on a GPU machine
    python benchmarks/gpu.py --quick                        # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from padim.core.anomaly_map import image_scores
from padim.core.config import PadimConfig
from padim.core.fitter import PadimFitter, build_model
from padim.io.listing import list_images
from padim.io.loading import iter_batches
from padim.jobs.engine import fit_images, score_images

CASES = (
    ("resnet18", 100, "random", 256),
    ("wide_resnet50_2", 550, "random", 96),
    ("efficientnet_lite0", 100, None, 256),
)

_OUT: list[Path] = []


def emit(record: dict[str, Any]) -> None:
    """Print one result as a JSON line (and append it to ``--out``)."""
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    for path in _OUT:
        with path.open("a") as handle:
            handle.write(line + "\n")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated since :func:`reset_peak`, in MB."""
    return torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None


def rate(step: Callable[[], Any], batch: int, device: torch.device, seconds: float, warmup: int = 2) -> float:
    """Images/s of ``step`` (one batch per call) over about ``seconds`` after a warm-up."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    calls = 0
    while True:
        step()
        calls += 1
        if calls % 4 == 0 or calls >= 2:
            synchronize(device)
            if time.perf_counter() - start >= seconds:
                break
    synchronize(device)
    return calls * batch / (time.perf_counter() - start)


def measure_case(name: str, d: int, weights: str | None, batch: int, device: torch.device, seconds: float) -> None:
    """Floor, fit and score figures of one backbone on device-resident synthetic batches."""
    config = PadimConfig(backbone=name, weights=weights, channels=d)
    tag = {"backbone": name, "d": d, "batch": batch, "device": str(device)}
    fitter = PadimFitter(config, device=device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    network = fitter.extractor.network
    cl = images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images

    def floor() -> None:
        with torch.inference_mode():
            network(cl)

    reset_peak(device)
    emit(
        {
            **tag,
            "bench": "floor_backbone",
            "images_per_s": rate(floor, batch, device, seconds),
            "peak_mb": peak_mb(device),
        }
    )
    if device.type == "cuda":

        def floor_amp() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                network(cl)

        emit({**tag, "bench": "floor_backbone_fp16", "images_per_s": rate(floor_amp, batch, device, seconds)})
    reset_peak(device)
    fit_rate = rate(functools.partial(fitter.update, images), batch, device, seconds)
    emit({**tag, "bench": "fit", "images_per_s": fit_rate, "peak_mb": peak_mb(device)})
    reset_peak(device)
    start = time.perf_counter()
    model = build_model(fitter)
    synchronize(device)
    emit({**tag, "bench": "finalize", "seconds": time.perf_counter() - start, "peak_mb": peak_mb(device)})
    del fitter  # frees the float64 statistics before the score figures
    model.accumulator = None
    extractor = model.extractor()

    def score_device() -> torch.Tensor:
        return image_scores(model.anomaly_maps(extractor.extract(images)))

    reset_peak(device)
    emit(
        {
            **tag,
            "bench": "score_device",
            "images_per_s": rate(score_device, batch, device, seconds),
            "peak_mb": peak_mb(device),
        }
    )
    host = images.cpu().pin_memory() if device.type == "cuda" else images
    emit({**tag, "bench": "score_host_maps", "images_per_s": rate(lambda: model.predict(host), batch, device, seconds)})
    reference = score_device().double().cpu()
    if device.type == "cuda":
        model.factor = model.factor.half()
        half_factor = score_device().double().cpu()
        model._extractor = None
        model.attach_backbone(extractor.backbone, amp_dtype=torch.float16)
        extractor = model.extractor()
        both = score_device().double().cpu()
        reset_peak(device)
        emit(
            {
                **tag,
                "bench": "score_device_fp16",
                "images_per_s": rate(score_device, batch, device, seconds),
                "peak_mb": peak_mb(device),
                "max_rel_change_factor_fp16": float(((half_factor - reference).abs() / reference).max()),
                "max_rel_change_factor_and_backbone_fp16": float(((both - reference).abs() / reference).max()),
            }
        )


def make_files(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[str]:
    """Write ``count`` textured JPEGs (quality 90) for the file-based measurements."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)

    def write(i: int) -> None:
        noise = np.random.default_rng(i).integers(-20, 20, base.shape)
        tile = np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(tile).resize(size, Image.Resampling.BILINEAR).save(folder / f"img_{i:05d}.jpg", quality=90)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        list(pool.map(write, range(count)))
    return list_images(str(folder))


def measure_files(device: torch.device, count: int, batch: int) -> None:
    """Decode-only and end-to-end (decode + device) images/s on generated JPEG files."""
    with tempfile.TemporaryDirectory(prefix="padim-gpu-") as scratch:
        uris = make_files(Path(scratch) / "images", count)
        config = PadimConfig(backbone="resnet18", weights="random", channels=100)
        fitter = PadimFitter(config, device=device)
        transform = fitter.preprocessor()
        start = time.perf_counter()
        n = sum(len(b) for b in iter_batches(uris, transform, batch))
        emit(
            {
                "bench": "decode_only",
                "images": n,
                "images_per_s": n / (time.perf_counter() - start),
                "workers": os.cpu_count(),
            }
        )
        tag = {"backbone": "resnet18", "d": 100, "batch": batch, "device": str(device), "images": len(uris)}
        fit_images(uris[: min(len(uris), 2 * batch)], config, batch_size=batch, device=device)  # warm-up
        reset_peak(device)
        result = fit_images(uris, config, batch_size=batch, device=device)
        synchronize(device)
        emit({**tag, "bench": "fit_end_to_end", "images_per_s": len(uris) / result.seconds, "peak_mb": peak_mb(device)})
        model = build_model(config, result.accumulator, weights_sha256=fitter.backbone.weights_sha256)
        list(score_images(model, uris[: 2 * batch], batch_size=batch, keep_maps="none"))  # warm-up
        start = time.perf_counter()
        scored = sum(1 for s in score_images(model, uris, batch_size=batch, keep_maps="none") if s.ok)
        synchronize(device)
        emit({**tag, "bench": "score_end_to_end", "images_per_s": scored / (time.perf_counter() - start)})


def main(argv: list[str] | None = None) -> int:
    """Run every measurement; a failing case is reported and the others go on."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement")
    parser.add_argument("--files", type=int, default=2048, help="generated JPEG files for the end-to-end figures")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CPU)")
    args = parser.parse_args(argv)
    if args.out:
        _OUT.append(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info: dict[str, Any] = {"bench": "environment", "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    info["cpus"] = os.cpu_count()
    emit(info)
    cases = [(n, d, w, 4 if args.quick else b) for n, d, w, b in CASES]
    for name, d, weights, batch in cases:
        if args.quick and name == "wide_resnet50_2":
            continue
        try:
            measure_case(name, d, weights, batch, device, 0.5 if args.quick else args.seconds)
        except Exception as exc:  # report and go on: device time is precious
            emit({"bench": "error", "backbone": name, "error": repr(exc), "trace": traceback.format_exc()[-2000:]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        measure_files(device, 16 if args.quick else args.files, 8 if args.quick else 256)
    except Exception as exc:
        emit({"bench": "error", "case": "files", "error": repr(exc), "trace": traceback.format_exc()[-2000:]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
