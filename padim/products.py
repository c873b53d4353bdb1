"""Per-product settings the scheduled flows need: where images arrive.

Stored as ``<store>/<product>/product.json``:

* ``incoming_url`` - where each night's production images land; ``{date}`` is replaced by the
  production date (``YYYY-MM-DD``), e.g. ``s3://factory/bottle/incoming/{date}``;
* ``landing_url`` - where new batches of *normal* images are dropped for retraining; each
  immediate sub-folder is one batch (the watch flow announces each new one once);
* ``normal_url`` - the folder the current model was trained from (written by training).
"""

from __future__ import annotations

import json
from datetime import date

from pydantic import BaseModel, ConfigDict, ValidationError

from padim.errors import ConfigError
from padim.fsio import join_url, read_bytes, write_bytes_atomic
from padim.store import ModelStore, validate_product

PRODUCT_FILE = "product.json"


class ProductSettings(BaseModel):
    """Where a product's images arrive.

    Attributes:
        product: Product name.
        incoming_url: Nightly production images, with an optional ``{date}`` placeholder.
        landing_url: Folder whose sub-folders are new batches of normal images.
        normal_url: Folder the current model was trained from.
    """

    model_config = ConfigDict(extra="forbid")

    product: str
    incoming_url: str | None = None
    landing_url: str | None = None
    normal_url: str | None = None

    def incoming_for(self, day: date) -> str:
        """The production image folder of a night.

        Args:
            day: Production date.

        Returns:
            ``incoming_url`` with ``{date}`` filled in.

        Raises:
            ConfigError: If the product has no ``incoming_url``.
        """
        if not self.incoming_url:
            raise ConfigError(f"product {self.product!r} has no incoming_url; set it with `padim configure`")
        return self.incoming_url.replace("{date}", day.isoformat())


def settings_url(store: ModelStore, product: str) -> str:
    """URL of a product's settings file."""
    return join_url(store.product_url(product), PRODUCT_FILE)


def read_product_settings(store: ModelStore, product: str) -> ProductSettings:
    """Read a product's settings (empty settings when none were saved).

    Args:
        store: Model store.
        product: Product name.

    Returns:
        The settings.

    Raises:
        ConfigError: If the file exists but is invalid.
    """
    validate_product(product)
    try:
        raw = read_bytes(settings_url(store, product))
    except FileNotFoundError:
        return ProductSettings(product=product)
    try:
        return ProductSettings.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"invalid {PRODUCT_FILE} for product {product!r}: {exc}") from exc


def update_product_settings(store: ModelStore, product: str, **changes: str | None) -> ProductSettings:
    """Change some of a product's settings (``None`` values are left as they are).

    Args:
        store: Model store.
        product: Product name.
        **changes: ``incoming_url``, ``landing_url`` or ``normal_url``.

    Returns:
        The new settings.
    """
    current = read_product_settings(store, product)
    merged = current.model_copy(update={k: v for k, v in changes.items() if v is not None})
    merged = ProductSettings.model_validate(merged.model_dump())
    write_bytes_atomic(settings_url(store, product), json.dumps(merged.model_dump(), indent=2).encode())
    return merged


def configured_products(store: ModelStore) -> list[ProductSettings]:
    """Products with a published model and an ``incoming_url`` (the nightly run's list).

    Args:
        store: Model store.

    Returns:
        Their settings, sorted by product name.
    """
    products = [read_product_settings(store, p) for p in store.products()]
    return [p for p in products if p.incoming_url]
