"""``padim demo``, ``padim serve`` and ``padim configure``: try the product, run it, set a product up.

``demo`` runs :func:`padim_cli.demo.run_demo`, ``serve`` serves the deployments
(:mod:`padim_cli.serving`), ``configure`` writes a product's own settings in the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from padim.settings import RetentionSettings, ScoreSettings, TrainSettings, default_of
from padim_cli.options import (
    Device,
    DeviceOpt,
    FprToleranceOpt,
    MaxThresholdChangeOpt,
    PrecisionChoice,
    PrecisionOpt,
    ProductOpt,
    RuntimeChoice,
    RuntimeOpt,
    StoreOpt,
)
from padim_cli.runner import absolute_url, check_product, resolve_store

__all__ = ["configure", "demo", "serve"]


def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", metavar="DIR", help="Working folder for the data set (and the store).")
    ] = Path("demo-work"),
    store: Annotated[
        str | None,
        typer.Option("--store", metavar="URL", help="Store root. Default: DIR/store.", show_default=False),
    ] = None,
    product: Annotated[str, typer.Option("--product", "-p", metavar="NAME", help="Product name.")] = "metal-plate",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic data set.")] = 0,
    device: DeviceOpt = Device(default_of(TrainSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(TrainSettings, "runtime")),
    precision: PrecisionOpt = PrecisionChoice(default_of(TrainSettings, "precision")),
) -> None:
    """Run the whole job end to end on a synthetic product: nothing to download.

    Makes a small data set of a brushed-metal surface (60 normal images to train on and a "night"
    of 24 new images, 15 of them with scratches, spots or cracks, with their masks) in DIR,
    trains the product's model with the default backbone (EfficientNet-Lite0, ImageNet weights
    shipped with the package) through the train flow, scores the night through the score flow
    (Parquet report and heat maps of the anomalous images), then prints the top anomalies, where
    the heat maps and the report are, and the image AUROC against the known labels. Takes 1-2
    minutes on 2 CPU cores.

    Examples:

    \b
        padim demo
        padim demo --workdir /tmp/padim-demo --device cpu
    """
    from padim_cli.demo import run_demo

    run_demo(workdir, store, product, seed=seed, device=device.value, runtime=runtime.value, precision=precision.value)


def serve(
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Most flow runs at once.", show_default=False)
    ] = None,
) -> None:
    """Serve the deployments (nightly, retrain, watch, train, score) from this process.

    The single-host alternative to a work pool and worker: reads `deployments/prefect.yaml`
    (schedules with time zones, event triggers, concurrency limits) and runs the flows here when
    they are due. It needs a running Prefect server for schedules and triggers: start one with
    `prefect server start` in another terminal and point this shell at it with
    `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`. Stop with Ctrl+C.

    Examples:

    \b
        prefect server start                    # in a first terminal
        export PREFECT_API_URL=http://127.0.0.1:4200/api
        PADIM_STORE=s3://padim/store padim serve
    """
    from padim_cli.environment import quiet_prefect_console
    from padim_cli.serving import check_server, serve_deployments

    check_server()
    quiet_prefect_console()
    serve_deployments(limit)


def configure(
    product: ProductOpt,
    incoming: Annotated[
        str | None,
        typer.Option(
            "--incoming",
            metavar="URL",
            help="Where each night's production images land; {date} becomes YYYY-MM-DD.",
            show_default=False,
        ),
    ] = None,
    landing: Annotated[
        str | None,
        typer.Option(
            "--landing",
            metavar="URL",
            help="Folder whose sub-folders are new batches of good images (for watch and retrain).",
            show_default=False,
        ),
    ] = None,
    reference_defects: Annotated[
        str | None,
        typer.Option(
            "--reference-defects",
            metavar="URL",
            help="Folder of known defect images a retrained model must still flag (promotion gate).",
            show_default=False,
        ),
    ] = None,
    max_threshold_change: MaxThresholdChangeOpt = None,
    fpr_tolerance: FprToleranceOpt = None,
    keep_versions: Annotated[
        int | None,
        typer.Option(
            "--keep-versions",
            min=0,
            metavar="N",
            help="Model versions kept after each publish, besides the one in use and candidates; 0 keeps all "
            f"(default {default_of(RetentionSettings, 'keep_versions')}).",
            show_default=False,
        ),
    ] = None,
    drift_min_images: Annotated[
        int | None,
        typer.Option(
            "--drift-min-images",
            min=1,
            metavar="N",
            help="Fewest scored images for a drift decision "
            f"(default {default_of(ScoreSettings, 'drift_min_images')}).",
            show_default=False,
        ),
    ] = None,
    drift_max_anomaly_rate: Annotated[
        float | None,
        typer.Option(
            "--drift-max-anomaly-rate",
            min=0.0,
            max=1.0,
            metavar="RATE",
            help="Share of anomalous images above which a night drifted (default: max(5 x the image FPR, 10 %)).",
            show_default=False,
        ),
    ] = None,
    drift_max_median_ratio: Annotated[
        float | None,
        typer.Option(
            "--drift-max-median-ratio",
            min=1.0,
            metavar="RATIO",
            help="Median score over the held-out median above which a night drifted "
            f"(default {default_of(ScoreSettings, 'drift_max_median_ratio')}).",
            show_default=False,
        ),
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Set where a product's images arrive, and its own gate, retention and drift settings.

    Writes `<store>/<product>/product.json`. The nightly flow scores every product with an
    incoming folder; the watch flow announces each new sub-folder of the landing folder once
    (event `padim.normal-images.added`, which triggers the retrain deployment). The other
    options override, for this product only, the defaults of padim/settings.py: the promotion
    gate of retrained models, how many versions are kept, and the nightly drift check (the
    nightly run uses a product's own bounds before its parameters). Without options, prints the
    current settings.

    Examples:

    \b
        padim configure --product bottle --incoming s3://factory/bottle/incoming/{date}
        padim configure --product bottle --landing s3://factory/bottle/new-good
    """
    from padim.io.store import ModelStore
    from padim.jobs.products import read_product_settings, update_product_settings

    check_product(product)
    model_store = ModelStore(resolve_store(store))
    changes = {
        "incoming_url": absolute_url(incoming, "incoming folder") if incoming is not None else None,
        "landing_url": absolute_url(landing, "landing folder") if landing is not None else None,
        "reference_defects_url": (
            absolute_url(reference_defects, "reference defects folder") if reference_defects is not None else None
        ),
        "max_threshold_change": max_threshold_change,
        "fpr_tolerance": fpr_tolerance,
        "keep_versions": keep_versions,
        "drift_min_images": drift_min_images,
        "drift_max_anomaly_rate": drift_max_anomaly_rate,
        "drift_max_median_ratio": drift_max_median_ratio,
    }
    if all(value is None for value in changes.values()):
        settings = read_product_settings(model_store, product)
    else:
        settings = update_product_settings(model_store, product, **changes)
        print(f"Saved the settings of {product} in {model_store.root}")
    for name, value in settings.model_dump().items():
        print(f"  {name:<24}{value if value is not None else '-'}")
    if incoming and "{date}" not in incoming:
        print("  note: --incoming has no {date}: every night scores the same folder")
