"""``padim score``, ``padim nightly`` and ``padim watch``: the production side of the job.

``score`` scores one folder into the product's Parquet report, ``nightly`` scores every configured
product's night, ``watch`` announces new batches of good images; each runs its Prefect flow in this
process (:func:`padim_cli.runner.run_flow`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from padim.settings import ScoreSettings, WatchSettings, default_of
from padim_cli.options import (
    BatchOpt,
    DaskOpt,
    DaskWorkersOpt,
    Device,
    DeviceOpt,
    DriftMaxRateOpt,
    DriftMaxRatioOpt,
    DriftMinImagesOpt,
    JsonOpt,
    PrecisionChoice,
    PrecisionOpt,
    ProductFilterOpt,
    ProductOpt,
    RuntimeChoice,
    RuntimeOpt,
    StoreOpt,
)
from padim_cli.render import print_json, score_lines
from padim_cli.runner import absolute_url, check_folder, check_model, check_product, iso_day, resolve_store, run_flow

__all__ = ["nightly", "score", "watch"]


def score(
    product: ProductOpt,
    images: Annotated[
        str,
        typer.Option("--images", metavar="URL", help="Folder (local or s3://) of the new production images."),
    ],
    store: StoreOpt = None,
    date: Annotated[
        datetime | None,
        typer.Option(
            "--date",
            formats=["%Y-%m-%d"],
            metavar="YYYY-MM-DD",
            help="Production date (the report partition). Default: today (UTC).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            "--version", metavar="V", help="Model version to score with. Default: the latest.", show_default=False
        ),
    ] = None,
    batch_size: BatchOpt = default_of(ScoreSettings, "batch_size"),
    device: DeviceOpt = Device(default_of(ScoreSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(ScoreSettings, "runtime")),
    precision: PrecisionOpt = PrecisionChoice(default_of(ScoreSettings, "precision")),
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per score task.")] = default_of(
        ScoreSettings, "shard_size"
    ),
    no_heatmaps: Annotated[
        bool, typer.Option("--no-heatmaps", help="Do not write heat maps of anomalous images.")
    ] = False,
    dask: DaskOpt = None,
    dask_workers: DaskWorkersOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a folder of production images into the product's Parquet report.

    Runs the score flow (the nightly job): every image becomes one report row (unreadable files
    too, with the reason), anomalous images get a heat map, and images this model version already
    scored that night with the same content are skipped, so a re-run adds nothing (a file rewritten
    under the same name is scored again). If storage cannot deliver some images, the others are
    scored and the command fails naming them; run it again to score the rest. Prints how many
    images were scored, skipped, found anomalous and unreadable, and the top anomalies.

    Examples:

    \b
        padim score --product bottle --images ./incoming/2026-11-25 --date 2026-11-25
        padim score -p bottle --images s3://factory/bottle/incoming/2026-11-25 --store s3://padim/store
    """
    check_product(product)
    root = resolve_store(store)
    images = check_folder(absolute_url(images, "production images folder"), "production images", root)
    check_model(root, product, version)
    result = run_flow(
        "score",
        dask=dask,
        dask_workers=dask_workers,
        product=product,
        images_url=images,
        store=root,
        date=iso_day(date.date() if date else None),
        version=version,
        batch_size=batch_size,
        device=device.value,
        runtime=runtime.value,
        precision=precision.value,
        shard_size=shard_size,
        heatmaps=not no_heatmaps,
    )
    if as_json:
        print_json(result)
        return
    from padim.reports.layout import partition_url

    day = datetime.strptime(result["date"], "%Y-%m-%d").date()
    print("\n".join(score_lines(result, partition_url(root, product, day))))


def nightly(
    date: Annotated[
        datetime | None,
        typer.Option(
            "--date",
            formats=["%Y-%m-%d"],
            metavar="YYYY-MM-DD",
            help="Production date. Default: today (UTC) minus --days-ago.",
            show_default=False,
        ),
    ] = None,
    days_ago: Annotated[int, typer.Option("--days-ago", min=0, help="Score the images of this many days ago.")] = 0,
    products: Annotated[
        list[str] | None,
        typer.Option("--product", "-p", metavar="NAME", help="Only these products (repeatable).", show_default=False),
    ] = None,
    store: StoreOpt = None,
    device: DeviceOpt = Device(default_of(ScoreSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(ScoreSettings, "runtime")),
    precision: PrecisionOpt = PrecisionChoice(default_of(ScoreSettings, "precision")),
    drift_min_images: DriftMinImagesOpt = default_of(ScoreSettings, "drift_min_images"),
    drift_max_anomaly_rate: DriftMaxRateOpt = default_of(ScoreSettings, "drift_max_anomaly_rate"),
    drift_max_median_ratio: DriftMaxRatioOpt = default_of(ScoreSettings, "drift_max_median_ratio"),
    as_json: JsonOpt = False,
) -> None:
    """Score the night's images of every configured product (what the nightly deployment runs).

    Each product with an incoming folder (see `padim configure`) is scored with its latest model;
    a product that fails does not stop the others, and the command fails at the end if any did.
    A store that does not exist or holds no model, no configured product, or a missing incoming
    folder fail with an error naming what to set; a night when nothing arrived is reported as such.
    Drift bounds: the product's own (`padim configure --drift-...`), else these options.

    Examples:

    \b
        padim nightly --date 2026-11-25
        padim nightly --days-ago 1 --product bottle --product tile
    """
    for name in products or []:
        check_product(name)
    root = resolve_store(store)
    result = run_flow(
        "nightly",
        store=root,
        date=iso_day(date.date() if date else None),
        days_ago=days_ago,
        products=list(products) if products else None,
        device=device.value,
        runtime=runtime.value,
        precision=precision.value,
        drift_min_images=drift_min_images,
        drift_max_anomaly_rate=drift_max_anomaly_rate,
        drift_max_median_ratio=drift_max_median_ratio,
    )
    if as_json:
        print_json(result)
        return
    for name, outcome in result["products"].items():
        if outcome.get("nothing_arrived"):
            print(f"{name} {result['date']}: nothing arrived (no image under {outcome['images_url']})")
            continue
        print(
            f"{name} {result['date']}: {outcome['n_scored']} scored, {outcome['n_skipped']} skipped, "
            f"{outcome['n_anomalies']} anomalies, {outcome['n_errors']} errors"
        )


def watch(
    store: StoreOpt = None,
    product: ProductFilterOpt = None,
    settle_seconds: Annotated[
        float, typer.Option("--settle-seconds", min=0.0, help="A batch must be unchanged this long to be announced.")
    ] = default_of(WatchSettings, "settle_seconds"),
    as_json: JsonOpt = False,
) -> None:
    """Look once for new batches of good images in the products' landing folders.

    Emits the event `padim.normal-images.added` once per new, settled batch (a sub-folder of the
    landing folder set with `padim configure --landing`); with a Prefect server and the retrain
    deployment served, each event starts a retrain. The watch deployment runs this on an interval.

    Examples:

    \b
        padim watch
        padim watch --product bottle --settle-seconds 0
    """
    if product is not None:
        check_product(product)
    announced = run_flow("watch", store=resolve_store(store), product=product, settle_seconds=settle_seconds)
    if as_json:
        print_json(announced)
        return
    if not announced:
        print("No new batch of good images")
    for batch in announced:
        print(
            f"{batch['product']}: announced batch {batch['batch']} ({batch['n_images']} images) at {batch['batch_url']}"
        )
