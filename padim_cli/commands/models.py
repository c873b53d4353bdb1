"""``padim models``, ``padim models promote`` and ``padim models prune``: a product's model versions.

A typer sub-app (``models_app``) mounted as ``models`` by :mod:`padim_cli.main`: its callback lists
the versions when no subcommand is given.
"""

from __future__ import annotations

from typing import Annotated

import typer

from padim_cli.options import CONTEXT_SETTINGS, PRODUCT_HELP, ListFormat, StoreOpt
from padim_cli.render import MODEL_HEADERS, format_table, model_rows, print_json
from padim_cli.runner import check_product, resolve_store

__all__ = ["models_app"]

models_app = typer.Typer(
    no_args_is_help=False,
    context_settings=CONTEXT_SETTINGS,
)


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    product: Annotated[
        str | None,
        typer.Option(
            "--product",
            "-p",
            metavar="NAME",
            help=PRODUCT_HELP,
            show_default=False,
        ),
    ] = None,
    store: StoreOpt = None,
    output_format: Annotated[
        ListFormat, typer.Option("--format", "-f", help="Output format.", case_sensitive=False)
    ] = ListFormat.table,
) -> None:
    """List a product's model versions, newest first, with their manifest summary.

    Shows the backbone, input geometry, embedding channels, number of training images, the
    calibrated image and pixel thresholds, the size, a `*` on the version scoring uses (LATEST)
    and a `c` on candidates: retrained versions the promotion gate kept out of use (why: below the
    table; `padim models promote` puts one in use). Subcommands: `promote`, `prune`.

    Examples:

    \b
        padim models --product bottle
        padim models -p bottle --store s3://padim/store --format json
        padim models promote bottle v20261128T031500Z-3fa2c1
        padim models prune bottle --keep 5
    """
    from padim.errors import ConfigError, ModelNotFoundError
    from padim.io.store import ModelStore

    if ctx.invoked_subcommand is not None:
        return
    if product is None:
        raise ConfigError("name the product: padim models --product NAME (or padim models promote|prune ...)")
    check_product(product)
    model_store = ModelStore(resolve_store(store))
    versions = model_store.versions(product)
    if not versions:
        raise ModelNotFoundError(f"no model for product {product!r} in {model_store.root}")
    if output_format is ListFormat.json:
        print_json(
            [
                {
                    "version": v.version,
                    "created_at": v.created_at,
                    "latest": v.is_latest,
                    "candidate": v.is_candidate,
                    "candidate_reason": (v.candidate or {}).get("reason"),
                    "url": v.url,
                    "size_bytes": v.size_bytes,
                    **{k: val for k, val in v.summary.items() if k != "channel_indices"},
                }
                for v in versions
            ]
        )
        return
    print(f"Models of {product} in {model_store.root} (* = latest, used by score; c = candidate, not in use):")
    print(format_table(MODEL_HEADERS, model_rows(versions)))
    for info in versions:
        if info.is_candidate:
            print(f"c {info.version}: {(info.candidate or {}).get('reason') or 'not promoted'}")


@models_app.command("promote")
def models_promote(
    product: Annotated[str, typer.Argument(help="Product name.", show_default=False)],
    version: Annotated[str, typer.Argument(help="The version to put in use (see padim models).", show_default=False)],
    store: StoreOpt = None,
) -> None:
    """Put a version in use: a candidate the promotion gate kept out, or an older version (rollback).

    Score runs from now on use it (`LATEST`); a candidate stops being one. The previous version
    stays in the store.

    Examples:

    \b
        padim models promote bottle v20261128T031500Z-3fa2c1
    """
    from padim.io.store import ModelStore

    check_product(product)
    model_store = ModelStore(resolve_store(store))
    previous = model_store.promote(product, version)
    print(f"{product}: version {version} is in use (was {previous or 'none'})")


@models_app.command("prune")
def models_prune(
    product: Annotated[str, typer.Argument(help="Product name.", show_default=False)],
    keep: Annotated[
        int,
        typer.Option("--keep", min=1, metavar="N", help="Newest versions to keep (the one in use and candidates too)."),
    ],
    store: StoreOpt = None,
) -> None:
    """Remove a product's old model versions, keeping the N newest.

    The version in use and every candidate are never removed, however old. Training and
    retraining apply the same rule after each publish with the product's `keep_versions` (default
    from padim/settings.py, RetentionSettings).

    Examples:

    \b
        padim models prune bottle --keep 5
    """
    from padim.io.store import ModelStore

    check_product(product)
    model_store = ModelStore(resolve_store(store))
    removed = model_store.prune(product, keep)
    print(f"{product}: removed {len(removed)} version(s)" + (": " + ", ".join(removed) if removed else ""))
