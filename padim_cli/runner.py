"""Checks that run before any work starts, and running the Prefect flows from the command line.

Cheap checks (product name, model options, folders, the model to score with) run here, before
Prefect is imported, so a typo fails in a second instead of after the temporary Prefect server has
started. The flows check the same things again: they are also run by deployments.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from padim_cli.environment import quiet_prefect_console

__all__ = [
    "absolute_url",
    "check_backbone",
    "check_folder",
    "check_model",
    "check_product",
    "check_store_exists",
    "load_flow",
    "resolve_store",
    "run_flow",
    "start_warm_up",
]


def absolute_url(url: str, what: str = "folder") -> str:
    """A local path made absolute (``~`` expanded); URLs with a scheme (``s3://``) unchanged.

    Folders are recorded in the store (the product's settings), so they must not depend on the
    directory the command happened to run in.

    Raises:
        ConfigError: For an empty or blank path (it would silently mean the current directory) or a
            URL without a bucket (``s3://``).
    """
    from padim_prefect.flows.params import resolve_url

    resolve_url(url, what)
    if "://" in url:
        return url
    return str(Path(url).expanduser().absolute())


def resolve_store(store: str | None) -> str:
    """The store root URL: ``store``, else ``$PADIM_STORE``, else ``./padim-store`` (absolute).

    Raises:
        ConfigError: For an empty ``store`` or a URL without a bucket.
    """
    from padim_prefect.flows.params import resolve_url

    from padim.io.store import ModelStore

    if store is not None:
        resolve_url(store, "store")
    root = ModelStore(store).root
    resolve_url(root, "store")
    return root


def check_product(product: str) -> str:
    """Validate a product name (raises ``InvalidProductNameError`` with the rule)."""
    from padim.io.store_layout import validate_product

    return validate_product(product)


def check_folder(url: str, what: str, store: str | None = None) -> str:
    """Check that an input folder exists and, given the store root, lies outside the store.

    Raises:
        ConfigError: Naming the folder.
    """
    from padim_prefect.flows.params import check_folder as check
    from padim_prefect.flows.params import check_outside_store

    from padim.io.store import ModelStore

    check(url, what)
    if store is not None:
        check_outside_store(url, ModelStore(store), what)
    return url


def check_backbone(name: str, weights: str | None, device: str, runtime: str = "auto", precision: str = "f32") -> None:
    """Load the backbone and its weights now (cached for the flow's tasks in this process).

    A missing ResNet weights file, a corrupt one, ``--device cuda`` without a GPU or a runtime that
    cannot run there then fails before the temporary Prefect server starts.

    Args:
        name: Backbone name.
        weights: Weights file URL, ``"random"`` or ``None`` for the default source.
        device: ``auto``, ``cpu`` or ``cuda``.
        runtime: ``auto``, ``torch`` or ``openvino``.
        precision: ``f32`` or ``bf16``.
    """
    from padim.core.backbones import get_backbone
    from padim.core.execution import resolve_device

    get_backbone(name, weights, resolve_device(device), runtime, precision)  # type: ignore[arg-type]


def check_store_exists(store: str) -> str:
    """Check that a store root exists (a typo would otherwise show an empty report)."""
    from padim.errors import StoreError
    from padim.io.fsio import exists

    if not exists(store):
        raise StoreError(f"no store at {store}; pass --store or set PADIM_STORE")
    return store


def check_model(store: str, product: str, version: str | None) -> str:
    """The model version a product would be scored with (raises ``ModelNotFoundError``).

    Args:
        store: Store root.
        product: Product name.
        version: A version name, or ``None`` for the latest.

    Returns:
        The version name.
    """
    from padim.io.store import ModelStore

    model_store = ModelStore(store)
    if version:
        model_store.version_url(product, version)
        return version
    return model_store.latest(product)


def parse_dask(dask: str | None) -> tuple[str, str | None]:
    """``--dask`` value to a task-runner kind and scheduler address.

    Args:
        dask: ``None`` (threads), ``"local"`` (a LocalCluster) or a scheduler address.

    Returns:
        ``(kind, address)``.
    """
    if not dask:
        return "threads", None
    if dask.strip().lower() == "local":
        return "dask", None
    return "dask", dask.strip()


def load_flow(name: str) -> Any:
    """Import the flow ``padim_prefect.flows.<name>.<name>`` and keep Prefect's console output quiet.

    Args:
        name: ``train``, ``score``, ``retrain``, ``watch`` or ``nightly``.

    Returns:
        The Prefect flow.
    """
    module = importlib.import_module(f"padim_prefect.flows.{name}")
    quiet_prefect_console()
    return getattr(module, name)


def start_ephemeral_server() -> None:
    """Start Prefect's temporary local server now, if no server is configured (else do nothing).

    The first flow run would start it anyway; starting it early lets it boot (a separate process)
    while this process does other work.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    SubprocessASGIServer().start()


def _warm_up(names: Sequence[str], preload: Callable[[], object] | None) -> None:
    """Import flows, start the temporary Prefect server, preload; failures are left to the real run."""
    try:
        for name in names:
            load_flow(name)
        start_ephemeral_server()
        if preload is not None:
            preload()
    except Exception:  # the flow run itself reports any real problem
        pass


def start_warm_up(names: Sequence[str], preload: Callable[[], object] | None = None) -> threading.Thread:
    """Import flows, boot the temporary Prefect server and run ``preload`` in the background.

    Args:
        names: Flow names to import.
        preload: Optional further work (e.g. loading the backbone into its cache).

    Returns:
        The thread; join it before running the flows.
    """
    thread = threading.Thread(target=_warm_up, args=(tuple(names), preload), name="padim-warm-up", daemon=True)
    thread.start()
    return thread


def run_flow(name: str, dask: str | None = None, dask_workers: int | None = None, **parameters: Any) -> Any:
    """Run a flow in this process (Prefect starts a temporary server unless one is configured).

    Args:
        name: Flow module and function name.
        dask: ``None`` for the default runner, ``"local"`` or a scheduler address for Dask.
        dask_workers: Worker processes of a local Dask cluster.
        **parameters: The flow's parameters.

    Returns:
        The flow's return value. A failed run re-raises the original exception.
    """
    flow = load_flow(name)
    kind, address = parse_dask(dask)
    if kind == "dask":
        from padim_prefect.flows.runners import with_task_runner

        flow = with_task_runner(flow, "dask", address, dask_workers)
    return flow(**parameters)


def iso_day(value: date | None) -> str | None:
    """``YYYY-MM-DD`` or ``None``."""
    return value.isoformat() if value is not None else None
