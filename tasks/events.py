"""Tasks that tell the outside world: Prefect events and artifacts."""

from __future__ import annotations

from typing import Any

from padim_prefect.tasks.policy import TASK_OPTIONS
from prefect import get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

MODEL_PUBLISHED = "padim.model.published"
MODEL_REJECTED = "padim.model.rejected"
INSPECTION_COMPLETED = "padim.inspection.completed"
DRIFT_DETECTED = "padim.drift.detected"
NORMAL_IMAGES_ADDED = "padim.normal-images.added"


def product_resource(product: str) -> dict[str, str]:
    """The Prefect event resource of a product (triggers match on ``padim.product``)."""
    return {"prefect.resource.id": f"padim.product.{product}", "padim.product": product}


@task(name="emit-event", **TASK_OPTIONS)
def emit_event_task(event: str, product: str, payload: dict[str, Any]) -> str | None:
    """Emit a Prefect event about a product.

    Args:
        event: Event name, e.g. ``padim.model.published``.
        product: Product name (the event's resource).
        payload: JSON-serialisable details.

    Returns:
        The event id, or ``None`` when events are disabled.
    """
    emitted = emit_event(event=event, resource=product_resource(product), payload=payload)
    get_run_logger().info("emitted %s for %s", event, product)
    return str(emitted.id) if emitted is not None else None


@task(name="publish-artifacts", **TASK_OPTIONS)
def publish_artifacts_task(
    key: str,
    markdown: str,
    table: list[dict[str, Any]] | None = None,
    images: list[tuple[str, str]] | None = None,
) -> None:
    """Leave a markdown summary (and optionally a table and images) on the flow run.

    Args:
        key: Artifact key (lowercase letters, digits and dashes).
        markdown: The summary.
        table: Rows of a table artifact, if any.
        images: ``(description, browser URL)`` of image artifacts (heat maps), in order.
    """
    create_markdown_artifact(markdown=markdown, key=key, description="padim run summary")
    if table:
        create_table_artifact(table=table, key=f"{key}-top", description="highest-scoring images")
    for rank, (description, url) in enumerate(images or [], start=1):
        create_image_artifact(image_url=url, key=f"{key}-heatmap-{rank}", description=description)
