"""The nightly flow: score every configured product's production images of the night."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger

from flows.params import check_product, open_store, parse_day
from flows.score import score
from padim.errors import PadimError
from padim.products import configured_products, read_product_settings
from padim.settings import Precision, Runtime, ScoreSettings, default_of


@flow(name="padim-nightly", validate_parameters=True)
def nightly(
    store: str | None = None,
    date: str | None = None,
    days_ago: int = 0,
    products: list[str] | None = None,
    device: str = default_of(ScoreSettings, "device"),
    runtime: Runtime = default_of(ScoreSettings, "runtime"),
    precision: Precision = default_of(ScoreSettings, "precision"),
) -> dict[str, Any]:
    """Run the score flow for each product that has an ``incoming_url``.

    A product that fails does not stop the others; the nightly run fails at the end if any did.

    Args:
        store: Store root.
        date: Production date; default today (UTC) minus ``days_ago``.
        days_ago: Score the images of this many days ago (1 for a run after midnight).
        products: Only these products; default every configured one.
        device: ``auto``, ``cpu`` or ``cuda``.
        runtime: Where the backbone runs (``auto``, ``torch``, ``openvino``).
        precision: Arithmetic of the OpenVINO backbone (``f32``, ``bf16``).

    Returns:
        Per product: the score summary or the error.
    """
    logger = get_run_logger()
    model_store = open_store(store)
    day = parse_day(date) - timedelta(days=days_ago if date is None else 0)
    selected = (
        [read_product_settings(model_store, check_product(p)) for p in products]
        if products
        else configured_products(model_store)
    )
    results: dict[str, Any] = {}
    failures = []
    for settings in selected:
        try:
            images_url = settings.incoming_for(day)
            results[settings.product] = score(
                product=settings.product,
                images_url=images_url,
                store=model_store.root,
                date=day.isoformat(),
                device=device,
                runtime=runtime,
                precision=precision,
            )
        except Exception as exc:  # one product's failure must not stop the others
            logger.error("%s: %s", settings.product, exc)
            results[settings.product] = {"error": str(exc)}
            failures.append(settings.product)
    if failures:
        raise PadimError(f"nightly scoring failed for {', '.join(failures)}; the other products were scored")
    return {"date": day.isoformat(), "products": results}
