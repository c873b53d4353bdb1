"""The watch flow: announce each new batch of normal images once (self-hosted Prefect has no webhooks)."""

from __future__ import annotations

from typing import Any

from padim_prefect.flows.naming import watch_run_name
from padim_prefect.flows.params import check_product, open_store
from padim_prefect.tasks.events import NORMAL_IMAGES_ADDED, emit_event_task
from padim_prefect.tasks.policy import RESULT_OPTIONS
from prefect import flow, get_run_logger

from padim.jobs.landing import mark_announced, new_batches
from padim.jobs.products import read_product_settings
from padim.settings import WatchSettings, default_of


@flow(name="padim-watch", flow_run_name=watch_run_name, validate_parameters=True, **RESULT_OPTIONS)
def watch(
    store: str | None = None,
    product: str | None = None,
    settle_seconds: float = default_of(WatchSettings, "settle_seconds"),
) -> list[dict[str, Any]]:
    """Emit ``padim.normal-images.added`` once per new, settled batch in each product's landing folder.

    Args:
        store: Store root.
        product: Only this product; default every product with a ``landing_url``.
        settle_seconds: A batch must be unchanged this long before it is announced.

    Returns:
        One record per announced batch.
    """
    logger = get_run_logger()
    model_store = open_store(store)
    names = [check_product(product)] if product else model_store.products()
    announced = []
    for name in names:
        settings = read_product_settings(model_store, name)
        if not settings.landing_url:
            continue
        for batch in new_batches(model_store, name, settings.landing_url, settle_seconds):
            payload = {"batch": batch.name, "batch_url": batch.url, "n_images": batch.n_images}
            event_id = emit_event_task(NORMAL_IMAGES_ADDED, name, payload)
            mark_announced(model_store, name, batch, event_id)
            logger.info("%s: announced batch %s (%d images)", name, batch.name, batch.n_images)
            announced.append({"product": name, **payload, "event_id": event_id})
    return announced
