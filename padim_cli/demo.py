"""``padim demo``: the whole job end to end on a synthetic product, nothing to download.

1. :func:`padim.evaluation.synthetic.make_demo_dataset` writes a brushed-metal product data set.
2. The train flow fits the product's model (default backbone, packaged ImageNet weights).
3. The score flow scores the night into the Parquet report and writes heat maps.
4. The report is read back: top anomalies, heat maps, image AUROC against the known labels.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from padim.core.config import PadimConfig
from padim.settings import TrainSettings, default_of
from padim_cli.render import format_table
from padim_cli.runner import check_backbone, check_product, resolve_store, run_flow, start_warm_up

__all__ = ["DEMO_MARKER", "DemoOutcome", "demo_metrics", "prepare_workdir", "run_demo"]

DEMO_MARKER = ".padim-demo"
DEMO_BACKBONE: str = default_of(PadimConfig, "backbone")
TOP_SHOWN = 10


@dataclass(frozen=True)
class DemoOutcome:
    """What the demo's report says about the night.

    Attributes:
        image_auroc: Image AUROC of the report scores against the known labels.
        n_defective: Defective night images.
        n_good: Good night images.
        defects_flagged: Defective images the model flagged as anomalous.
        good_flagged: Good images flagged as anomalous.
    """

    image_auroc: float
    n_defective: int
    n_good: int
    defects_flagged: int
    good_flagged: int


def prepare_workdir(workdir: Path, clear_store: bool) -> Path:
    """Create (or reuse) the demo's working folder.

    A folder is reused only when an earlier demo made it (it holds the ``.padim-demo`` marker); its
    data set, and its store when ``clear_store``, are removed so the run starts clean.

    Args:
        workdir: The folder.
        clear_store: Also remove ``workdir/store``.

    Returns:
        The absolute folder.

    Raises:
        ConfigError: If the folder exists, is not empty and was not made by the demo.
    """
    from padim.errors import ConfigError

    folder = workdir.expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--workdir {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / DEMO_MARKER).exists():
        raise ConfigError(f"{folder} is not empty and was not made by `padim demo`; choose another --workdir")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("made by `padim demo`; safe to delete\n", encoding="utf-8")
    shutil.rmtree(folder / "data", ignore_errors=True)
    if clear_store:
        shutil.rmtree(folder / "store", ignore_errors=True)
    return folder


class Stopwatch:
    """Wall time of successive steps and of the whole run."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or the start)."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed

    def total(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self._start


def demo_metrics(rows: list[Mapping[str, Any]], labels: Mapping[str, str]) -> DemoOutcome:
    """Compare the report's rows with the known kind of every night image.

    Args:
        rows: Report rows (``image_uri``, ``score``, ``is_anomaly``, ``status``).
        labels: Kind by file name (``"good"`` for normal images).

    Returns:
        AUROC and flag counts.
    """
    from padim.evaluation.metrics import image_auroc

    scored = [r for r in rows if r.get("status") == "ok" and os.path.basename(str(r["image_uri"])) in labels]
    defective = [labels[os.path.basename(str(r["image_uri"]))] != "good" for r in scored]
    auroc = image_auroc([int(d) for d in defective], [float(r["score"]) for r in scored])
    return DemoOutcome(
        image_auroc=auroc,
        n_defective=sum(defective),
        n_good=len(defective) - sum(defective),
        defects_flagged=sum(bool(r["is_anomaly"]) and d for r, d in zip(scored, defective, strict=True)),
        good_flagged=sum(bool(r["is_anomaly"]) and not d for r, d in zip(scored, defective, strict=True)),
    )


def _shown_path(url: str | None, base: Path) -> str:
    """A path relative to the working folder when it lies inside it."""
    if not url:
        return "-"
    try:
        return str(Path(url).relative_to(base))
    except ValueError:
        return url


def _top_table(rows: list[Mapping[str, Any]], labels: Mapping[str, str], base: Path) -> str:
    """The highest-scoring report rows with their true kind."""
    ranked = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: float(r["score"]), reverse=True)
    table = [
        [
            rank,
            os.path.basename(str(r["image_uri"])),
            labels.get(os.path.basename(str(r["image_uri"])), "?"),
            f"{float(r['score']):.1f}",
            f"{float(r['normalized_score']):.2f}",
            "yes" if r["is_anomaly"] else "no",
            _shown_path(r.get("heatmap_uri"), base),
        ]
        for rank, r in enumerate(ranked[:TOP_SHOWN], start=1)
    ]
    return format_table(("#", "image", "truth", "score", "norm.", "anomaly", "heat map"), table)


def run_demo(
    workdir: Path,
    store: str | None,
    product: str,
    seed: int = 0,
    device: str = default_of(TrainSettings, "device"),
    runtime: str = default_of(TrainSettings, "runtime"),
    precision: str = default_of(TrainSettings, "precision"),
) -> DemoOutcome:
    """Run the demo and print what it found.

    Args:
        workdir: Working folder (data set, and the store unless ``store`` is given).
        store: Store root; default ``workdir/store``.
        product: Product name.
        seed: Seed of the synthetic data set.
        device: ``auto``, ``cpu`` or ``cuda``.
        runtime: Where the CNN runs (``auto``, ``torch``, ``openvino``).
        precision: Arithmetic of the OpenVINO CNN (``f32``, ``bf16``).

    Returns:
        The night's figures.
    """
    from padim.evaluation.synthetic import make_demo_dataset

    check_product(product)
    base = prepare_workdir(workdir, clear_store=store is None)
    root = resolve_store(store or str(base / "store"))
    day = datetime.now(timezone.utc).date().isoformat()
    print(f"padim demo: a synthetic brushed-metal product, end to end, in {base}\n", flush=True)

    clock = Stopwatch()
    # Prefect boots and the backbone loads while the data set is drawn
    execution = {"device": device, "runtime": runtime, "precision": precision}
    warm_up = start_warm_up(["train", "score"], preload=lambda: check_backbone(DEMO_BACKBONE, None, **execution))
    dataset = make_demo_dataset(base / "data", seed=seed)
    n_train = len(list(dataset.train_dir.glob("*.png")))
    print(
        f"[1/4] Data set: {n_train} good images to train on; a night of {len(dataset.labels)} images, "
        f"{dataset.n_defective} with scratches, spots or cracks ({clock.lap():.1f} s)\n"
        f"      {dataset.root} (MVTec layout; the night in night/, its masks in night_masks/)",
        flush=True,
    )
    warm_up.join()
    trained = run_flow(
        "train",
        product=product,
        normal_url=str(dataset.train_dir),
        store=root,
        **execution,
    )
    print(
        f"[2/4] Trained {product} ({DEMO_BACKBONE}, ImageNet weights): version {trained['version']}, "
        f"{trained['n_train']} images ({trained['n_calibration']} first held out to calibrate), "
        f"threshold {trained['image_threshold']:.1f} ({clock.lap():.1f} s, Prefect start included)",
        flush=True,
    )
    scored = run_flow("score", product=product, images_url=str(dataset.night_dir), store=root, date=day, **execution)
    print(
        f"[3/4] Scored the night of {day}: {scored['n_scored']} images, {scored['n_anomalies']} anomalies, "
        f"{scored['n_errors']} errors ({clock.lap():.1f} s)",
        flush=True,
    )
    outcome = _report_findings(root, product, trained["version"], day, dataset.labels, base)
    print(f"\nDemo finished in {clock.total():.0f} s.")
    return outcome


def _report_findings(
    root: str, product: str, version: str, day: str, labels: Mapping[str, str], base: Path
) -> DemoOutcome:
    """Read the night back from the Parquet report and print the findings."""
    from padim.io.store import ModelStore
    from padim.reports import query_reports
    from padim.reports.export import to_json_records
    from padim.reports.layout import partition_url

    rows = to_json_records(query_reports(root, product=product, since=day, until=day, model_version=version))
    outcome = demo_metrics(rows, labels)
    heatmaps = ModelStore(root).artifact_url(product, "heatmaps", day, version)
    report = partition_url(root, product, datetime.strptime(day, "%Y-%m-%d").date())
    print(f"[4/4] Top anomalies, read back from the report ({len(rows)} rows):\n")
    print(_top_table(rows, labels, base) + "\n")
    print(
        f"Image AUROC on the demo night: {outcome.image_auroc:.3f} "
        f"({outcome.n_defective} defective vs {outcome.n_good} good images); "
        f"defects flagged {outcome.defects_flagged}/{outcome.n_defective}, "
        f"good images flagged {outcome.good_flagged}/{outcome.n_good}"
    )
    print(f"Heat maps: {heatmaps}/ (one PNG per anomalous image)")
    print(f"Report:    {report}/")
    print("\nTry next:")
    print(f"  padim report --store {root} --product {product} --anomalies")
    print(f"  padim models --store {root} --product {product}")
    print(f"  padim evaluate {base / 'data'} --figures {base / 'figures'}   # pixel metrics against the masks")
    return outcome
