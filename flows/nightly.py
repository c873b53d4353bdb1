"""The nightly flow: score every configured product's production images of the night.

A misconfigured worker fails loudly instead of completing with nothing scored: a store that does
not exist or holds no model, no product with an incoming folder, or an incoming folder whose base
is missing fail the run, naming the variable or setting to fix (``PADIM_STORE``, ``incoming_url``).
A night when nothing arrived (tonight's ``{date}`` folder is absent or holds no image) completes
with a warning line and says so in the nightly summary artifact.
"""

from __future__ import annotations

import os
from datetime import date, timedelta
from typing import Any

from padim_prefect.flows.naming import nightly_run_name
from padim_prefect.flows.params import check_product, open_store, parse_day, resolve_url
from padim_prefect.flows.score import score
from padim_prefect.flows.train import artifact_key
from padim_prefect.tasks.events import publish_artifacts_task
from padim_prefect.tasks.policy import RESULT_OPTIONS
from padim_prefect.tasks.storage import list_images_task
from prefect import flow, get_run_logger

from padim.errors import ConfigError, PadimError
from padim.io.store import ModelStore
from padim.io.store_layout import STORE_ENV_VAR
from padim.jobs.products import ProductSettings, configured_products, read_product_settings
from padim.settings import Precision, Runtime, ScoreSettings, default_of


def store_origin(given: str | None) -> str:
    """Where the store URL of a run came from, in words (for error messages)."""
    if given:
        return "the run's `store` parameter"
    if os.environ.get(STORE_ENV_VAR, "").strip():
        return f"{STORE_ENV_VAR} of the process running the flow"
    return f"{STORE_ENV_VAR} is unset in the process running the flow, so the default ./padim-store"


def check_store(model_store: ModelStore, given: str | None) -> None:
    """Refuse a store that does not exist or holds no model.

    Args:
        model_store: The store.
        given: The ``store`` parameter of the run (``None``: from the environment).

    Raises:
        ConfigError: Naming the store, where its URL came from and what to set.
    """
    fs, path = resolve_url(model_store.root, "store")
    hint = f"set {STORE_ENV_VAR} in the worker's environment (or the deployment's `store` parameter)"
    if not fs.isdir(path):
        raise ConfigError(f"store {model_store.root} does not exist ({store_origin(given)}); {hint}")
    if not model_store.products():
        raise ConfigError(
            f"store {model_store.root} holds no model ({store_origin(given)}); {hint} to the store the models "
            "were trained into, or train one with `padim train`"
        )


def tonight_folder(settings: ProductSettings, day: date) -> str | None:
    """Tonight's production folder of a product, or ``None`` when nothing arrived tonight.

    Args:
        settings: The product's settings.
        day: Production date.

    Returns:
        The folder URL; ``None`` when ``incoming_url`` has a ``{date}`` and tonight's folder is
        absent while the folder above it exists.

    Raises:
        ConfigError: No ``incoming_url``, or its fixed part (the folder above ``{date}``, or the
            whole folder without ``{date}``) does not exist.
    """
    url = settings.incoming_for(day)
    fs, path = resolve_url(url, "incoming folder")
    if fs.isdir(path):
        return url
    template = settings.incoming_url or ""
    base = template.split("{date}", 1)[0].rsplit("/", 1)[0] if "{date}" in template else url
    base_fs, base_path = resolve_url(base, "incoming folder")
    if base != url and base_fs.isdir(base_path):
        return None
    raise ConfigError(
        f"incoming folder of product {settings.product!r} not found: {base} (incoming_url = {template}); "
        f"fix it with `padim configure --product {settings.product} --incoming URL`"
    )


def summarise_night(day: date, results: dict[str, Any]) -> str:
    """Markdown summary of a nightly run across products."""
    lines = [
        f"# Nightly inspection {day.isoformat()}",
        "",
        "| product | status | images | scored | anomalies | errors | drift | model version |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for product, outcome in results.items():
        if "error" in outcome:
            lines.append(f"| {product} | **failed**: {outcome['error']} | - | - | - | - | - | - |")
            continue
        status = "nothing arrived" if outcome.get("nothing_arrived") else "scored"
        drift = outcome.get("drift") or {}
        lines.append(
            f"| {product} | {status} | {outcome.get('n_images', 0)} | {outcome.get('n_scored', 0)} | "
            f"{outcome.get('n_anomalies', 0)} | {outcome.get('n_errors', 0)} | "
            f"{'; '.join(drift.get('reasons') or []) or ('yes' if drift.get('detected') else 'no')} | "
            f"{outcome.get('model_version') or '-'} |"
        )
    quiet = [p for p, o in results.items() if o.get("nothing_arrived")]
    if quiet:
        lines += ["", f"**Nothing arrived tonight** for {', '.join(quiet)}: no image in tonight's incoming folder."]
    return "\n".join(lines)


def nothing_arrived(images_url: str) -> dict[str, Any]:
    """The outcome of a product whose images did not arrive tonight."""
    counts = dict.fromkeys(("n_images", "n_scored", "n_skipped", "n_anomalies", "n_errors"), 0)
    return {"nothing_arrived": True, "images_url": images_url, **counts}


@flow(name="padim-nightly", flow_run_name=nightly_run_name, validate_parameters=True, **RESULT_OPTIONS)
def nightly(
    store: str | None = None,
    date: str | None = None,
    days_ago: int = 0,
    products: list[str] | None = None,
    device: str = default_of(ScoreSettings, "device"),
    runtime: Runtime = default_of(ScoreSettings, "runtime"),
    precision: Precision = default_of(ScoreSettings, "precision"),
    drift_min_images: int = default_of(ScoreSettings, "drift_min_images"),
    drift_max_anomaly_rate: float | None = default_of(ScoreSettings, "drift_max_anomaly_rate"),
    drift_max_median_ratio: float = default_of(ScoreSettings, "drift_max_median_ratio"),
) -> dict[str, Any]:
    """Run the score flow for each product that has an ``incoming_url``.

    A product that fails does not stop the others; the nightly run fails at the end if any did.
    A product whose images did not arrive tonight is logged as a warning and listed in the
    summary artifact; it does not fail the run.

    Args:
        store: Store root; default ``$PADIM_STORE``, else ``./padim-store``.
        date: Production date; default today (UTC) minus ``days_ago``.
        days_ago: Score the images of this many days ago (1 for a run after midnight).
        products: Only these products; default every configured one.
        device: ``auto``, ``cpu`` or ``cuda``.
        runtime: Where the backbone runs (``auto``, ``torch``, ``openvino``).
        precision: Arithmetic of the OpenVINO backbone (``f32``, ``bf16``).
        drift_min_images: Fewest scored images for a drift decision, for products that do not
            set their own (``padim configure --drift-min-images``).
        drift_max_anomaly_rate: Drift bound on the anomaly share (``None``: from the calibrated
            FPR), for products that do not set their own.
        drift_max_median_ratio: Drift bound on the median score ratio, for products that do not
            set their own.

    Returns:
        Per product: the score summary, ``nothing_arrived``, or the error.

    Raises:
        ConfigError: The store does not exist or holds no model, or no product is configured.
        PadimError: A product failed (after the others were scored).
    """
    logger = get_run_logger()
    model_store = open_store(store)
    check_store(model_store, store)
    day = parse_day(date) - timedelta(days=days_ago if date is None else 0)
    selected = (
        [read_product_settings(model_store, check_product(p)) for p in products]
        if products
        else configured_products(model_store)
    )
    if not selected:
        raise ConfigError(
            f"no product in store {model_store.root} has an incoming folder (incoming_url): set one with "
            "`padim configure --product NAME --incoming 'URL/{date}'`"
        )
    defaults = {
        "drift_min_images": drift_min_images,
        "drift_max_anomaly_rate": drift_max_anomaly_rate,
        "drift_max_median_ratio": drift_max_median_ratio,
    }
    results: dict[str, Any] = {}
    failures = []
    for settings in selected:
        try:
            images_url = tonight_folder(settings, day)
            if images_url is None or not list_images_task(images_url):
                url = images_url or settings.incoming_for(day)
                logger.warning("%s %s: nothing arrived tonight: no images under %s", settings.product, day, url)
                results[settings.product] = nothing_arrived(url)
                continue
            results[settings.product] = score(
                product=settings.product,
                images_url=images_url,
                store=model_store.root,
                date=day.isoformat(),
                device=device,
                runtime=runtime,
                precision=precision,
                **{**defaults, **settings.drift()},
            )
        except Exception as exc:  # one product's failure must not stop the others
            logger.error("%s: %s", settings.product, exc)
            results[settings.product] = {"error": str(exc)}
            failures.append(settings.product)
    publish_artifacts_task(artifact_key("nightly", "summary"), summarise_night(day, results))
    if failures:
        raise PadimError(f"nightly scoring failed for {', '.join(failures)}; the other products were scored")
    return {"date": day.isoformat(), "products": results}
