"""Bytes of one model version and the time to load it: ``padim.model/2`` against ``padim.model/1``.

``padim.model/2`` stores the float64 statistics and derives the scoring means and whitening
factors from them at load (:func:`padim.core.fitter.finalize_gaussians`, as the fit does);
``padim.model/1`` also stored the float32 mean and packed factor. The sizes do not depend on
the values, so synthetic statistics of the right shape stand in for a fit (no data set, no
backbone weights): at the defaults, EfficientNet-Lite0 with every d = 176 channels at
224 x 224 (G = 56 x 56 = 3136 Gaussians). Each load runs in a fresh process (its peak RSS is
its own; the layouts and modes alternate); the files are read from the page cache.

    python benchmarks/version_size.py --repeats 3 --out benchmarks/results/version-size-d176.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def synthetic_model(backbone: str, channels: int | None, n: int, seed: int):
    """A model finalised from random positive-definite statistics of the configuration's shape,
    and the seconds its finalisation (:func:`padim.core.fitter.build_model`, as in a fit) took."""
    from padim.core.backbones import get_spec
    from padim.core.config import PadimConfig
    from padim.core.fitter import build_model
    from padim.core.geometry import grid_size, resolve_channels
    from padim.core.model import TrainingInfo
    from padim.core.statistics import GaussianAccumulator

    config = PadimConfig(backbone=backbone, channels=channels)
    spec = get_spec(backbone)
    d = resolve_channels(config, spec)
    h, w = grid_size(config, spec)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(h * w, d, d, generator=generator, dtype=torch.float64).sub_(0.5).mul_(1e-3)
    m2 = (noise + noise.transpose(1, 2)).add_(torch.eye(d, dtype=torch.float64)).mul_(n - 1)  # diagonally dominant
    state = {
        "n": torch.tensor([n]),
        "mean": torch.randn(h * w, d, generator=generator, dtype=torch.float64),
        "m2": m2,
    }
    accumulator = GaussianAccumulator.from_state_dict(state)
    training = TrainingInfo(n_train=n, training_set_sha256="0" * 64)
    start = time.perf_counter()
    model = build_model(config, accumulator, weights_sha256="synthetic", training=training)
    return model, time.perf_counter() - start


def write_v1(model, directory: Path) -> None:
    """The same version in the ``padim.model/1`` layout (mean and packed factor stored too)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from padim.core.covariance import pack_lower
    from padim.io.artifact import MANIFEST, MODEL_FILE, save_model

    save_model(model, str(directory))
    path = directory / MODEL_FILE
    tensors = load_file(str(path))
    tensors["mean"] = model.mean.detach().float().cpu().contiguous()
    tensors["factor_packed"] = pack_lower(model.factor.detach().cpu())
    save_file(tensors, str(path), metadata={"format": "padim.model/1"})
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["format"] = "padim.model/1"
    manifest.pop("factor_storage", None)
    manifest.pop("statistics_device", None)
    data = path.read_bytes()
    manifest["files"][MODEL_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def factor_digest(model) -> str:
    """sha256 of the model's means and factors, to check that both layouts load the same bits."""
    import hashlib

    digest = hashlib.sha256(model.mean.cpu().contiguous().numpy().tobytes())
    digest.update(model.factor.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``: unlike ``ru_maxrss``, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_once(url: str, with_statistics: bool) -> dict[str, float]:
    """Load a version in this process; its seconds and this process's peak RSS."""
    from padim.io.artifact import load_model

    start = time.perf_counter()
    model = load_model(url, with_statistics=with_statistics)
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "factor_sha256": factor_digest(model)}


def sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())}


def main(argv: list[str] | None = None) -> int:
    """Write both layouts of one synthetic version, measure them and print one JSON line per layout."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--channels", type=int, default=None, help="d (default: the backbone's)")
    parser.add_argument("--n", type=int, default=200, help="images in the synthetic statistics")
    parser.add_argument("--repeats", type=int, default=3, help="loads per layout and mode (median reported)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--child", nargs=2, metavar=("URL", "WITH_STATISTICS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(load_once(args.child[0], args.child[1] == "1")))
        return 0

    from padim import __version__
    from padim.core.geometry import num_gaussians
    from padim.io.artifact import MODEL_FORMAT, save_model

    model, finalise_s = synthetic_model(args.backbone, args.channels, args.n, seed=0)
    g, d = model.mean.shape
    assert g == num_gaussians(model.config, model.grid)
    root = Path(tempfile.mkdtemp(prefix="padim-version-size-"))
    lines = []
    try:
        layouts = {MODEL_FORMAT: root / "v2", "padim.model/1": root / "v1"}
        save_model(model, str(layouts[MODEL_FORMAT]))
        write_v1(model, layouts["padim.model/1"])
        reference = factor_digest(model)
        del model
        modes = {"serve": "0", "refit": "1"}
        runs: dict[tuple[str, str], list[dict]] = {(layout, mode): [] for layout in layouts for mode in modes}
        for _ in range(args.repeats):  # interleaved, so that load from other work spreads over both layouts
            for (layout, mode), results in runs.items():
                child = [sys.executable, __file__, "--child", str(layouts[layout]), modes[mode]]
                output = subprocess.run(child, check=True, capture_output=True, text=True).stdout
                results.append(json.loads(output.strip().splitlines()[-1]))
                if results[-1]["factor_sha256"] != reference:
                    raise SystemExit(f"{layout}: the loaded means and factors differ from the fitted ones")
        for layout, directory in layouts.items():
            files = sizes(directory)
            loads = {
                mode: {
                    "load_s_min": min(r["seconds"] for r in runs[layout, mode]),
                    "load_s_median": statistics.median(r["seconds"] for r in runs[layout, mode]),
                    "load_s_all": [round(r["seconds"], 3) for r in runs[layout, mode]],
                    "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs[layout, mode]),
                }
                for mode in modes
            }
            lines.append(
                {
                    "bench": "version_size",
                    "format": layout,
                    "backbone": args.backbone,
                    "d": int(d),
                    "gaussians": int(g),
                    "files": files,
                    "total_bytes": sum(files.values()),
                    "factor_packed_bytes": 4 * int(g) * int(d) * (int(d) + 1) // 2,
                    "mean_bytes": 4 * int(g) * int(d),
                    "serve": loads["serve"],
                    "refit": loads["refit"],
                    "finalise_in_fit_s": round(finalise_s, 3),
                    "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "padim": __version__,
                    "machine": platform.machine(),
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for line in lines:
        print(json.dumps(line))
    if args.out:
        with open(args.out, "a") as handle:
            for line in lines:
                handle.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
