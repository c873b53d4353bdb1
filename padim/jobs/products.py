"""Per-product settings the scheduled flows need: where images arrive.

Stored as ``<store>/<product>/product.json``:

* ``incoming_url`` - where each night's production images land; ``{date}`` is replaced by the
  production date (``YYYY-MM-DD``), e.g. ``s3://factory/bottle/incoming/{date}``;
* ``landing_url`` - where new batches of *normal* images are dropped for retraining; each
  immediate sub-folder is one batch (the watch flow announces each new one once);
* ``normal_url`` - the folder the current model was trained from (written by training);
* ``reference_defects_url`` - images of known defects a retrained model must still flag (the
  promotion gate, :mod:`padim.jobs.promotion`);
* overrides of the defaults in :mod:`padim.settings` for this product: the promotion gate
  (``max_threshold_change``, ``fpr_tolerance``), retention (``keep_versions``) and the nightly
  drift check (``drift_min_images``, ``drift_max_anomaly_rate``, ``drift_max_median_ratio``);
  unset (``null``) means the default.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from padim.errors import ConfigError
from padim.io.fsio import join_url, read_bytes, write_bytes_atomic
from padim.io.store import ModelStore
from padim.io.store_layout import validate_product
from padim.settings import GateSettings, RetentionSettings, ScoreSettings

PRODUCT_FILE = "product.json"


class ProductSettings(BaseModel):
    """Where a product's images arrive.

    Attributes:
        product: Product name.
        incoming_url: Nightly production images, with an optional ``{date}`` placeholder.
        landing_url: Folder whose sub-folders are new batches of normal images.
        normal_url: Folder the current model was trained from.
        reference_defects_url: Folder of known defect images the promotion gate checks.
        max_threshold_change: Override of :attr:`GateSettings.max_threshold_change`.
        fpr_tolerance: Override of :attr:`GateSettings.fpr_tolerance`.
        keep_versions: Override of :attr:`RetentionSettings.keep_versions` (``0`` keeps all).
        drift_min_images: Override of :attr:`ScoreSettings.drift_min_images`.
        drift_max_anomaly_rate: Override of :attr:`ScoreSettings.drift_max_anomaly_rate`.
        drift_max_median_ratio: Override of :attr:`ScoreSettings.drift_max_median_ratio`.
    """

    model_config = ConfigDict(extra="forbid")

    product: str
    incoming_url: str | None = None
    landing_url: str | None = None
    normal_url: str | None = None
    reference_defects_url: str | None = None
    max_threshold_change: float | None = Field(default=None, gt=0.0)
    fpr_tolerance: float | None = Field(default=None, ge=0.0, lt=1.0)
    keep_versions: int | None = Field(default=None, ge=0)
    drift_min_images: int | None = Field(default=None, ge=1)
    drift_max_anomaly_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    drift_max_median_ratio: float | None = Field(default=None, gt=1.0)

    def gate(self, **overrides: float | None) -> GateSettings:
        """The promotion gate's bounds: ``overrides`` (not None), else this product's, else the defaults."""
        return GateSettings(**_merged(self, GateSettings, overrides))

    def keep(self, override: int | None = None) -> int | None:
        """Versions to keep after a publish (``None``: keep all); ``override`` wins, ``0`` means all."""
        value = override if override is not None else self.keep_versions
        if value is None:
            return RetentionSettings().keep_versions
        return value or None

    def drift(self, **overrides: float | int | None) -> dict[str, Any]:
        """The drift bounds of :class:`ScoreSettings` set by ``overrides`` or this product (unset ones omitted)."""
        names = ("drift_min_images", "drift_max_anomaly_rate", "drift_max_median_ratio")
        return {k: v for k, v in _merged(self, ScoreSettings, overrides).items() if k in names}

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


def _merged(product: ProductSettings, model: type[BaseModel], overrides: dict[str, Any]) -> dict[str, Any]:
    """Fields of ``model`` set by ``overrides`` (first) or by the product's settings (unset ones left out)."""
    values: dict[str, Any] = {}
    for name in model.model_fields:
        value = overrides.get(name)
        if value is None:
            value = getattr(product, name, None)
        if value is not None:
            values[name] = value
    return values


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


def update_product_settings(store: ModelStore, product: str, **changes: Any) -> ProductSettings:
    """Change some of a product's settings (``None`` values are left as they are).

    Args:
        store: Model store.
        product: Product name.
        **changes: Fields of :class:`ProductSettings` (``incoming_url``, ``landing_url``, ...).

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
