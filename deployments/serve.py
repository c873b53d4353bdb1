"""Serve the deployments of ``prefect.yaml`` from one process (``padim serve``).

The YAML file is the single source of truth: this module reads it and builds the same deployments
(schedules, triggers, parameters, concurrency limits) as runner deployments, so a single host needs
no work pool and no worker. It needs a running Prefect server (``prefect server start``) for
schedules and triggers to fire.
"""

from __future__ import annotations

import importlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron, Interval, Schedule

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
NAMESPACE = "padim_prefect"
"""The package the orchestration folders (``flows/``, ``tasks/``, ``deployments/``) are installed under."""


def load_definitions(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """Read the deployment entries of a ``prefect.yaml``.

    Args:
        path: The file.

    Returns:
        One dictionary per deployment.
    """
    document = yaml.safe_load(path.read_text())
    return list(document.get("deployments") or [])


def load_entrypoint(entrypoint: str) -> Any:
    """Import the flow an entrypoint (``flows/train.py:train``) names.

    The orchestration folders are installed under the ``padim_prefect`` namespace, so
    ``flows/train.py`` is the module ``padim_prefect.flows.train``.

    Args:
        entrypoint: ``path/to/module.py:function``, relative to the project folder.

    Returns:
        The flow object.
    """
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(f"{NAMESPACE}.{path.removesuffix('.py').replace('/', '.')}")
    return getattr(module, name)


def build_schedules(entries: list[dict[str, Any]] | None) -> list[Schedule]:
    """Prefect schedules from YAML schedule entries (cron or interval, with a time zone)."""
    schedules = []
    for entry in entries or []:
        timezone = entry.get("timezone")
        active = bool(entry.get("active", True))
        if entry.get("cron"):
            schedules.append(Cron(entry["cron"], timezone=timezone, active=active))
        elif entry.get("interval"):
            schedules.append(Interval(timedelta(seconds=float(entry["interval"])), timezone=timezone, active=active))
        else:
            raise ValueError(f"schedule entry needs cron or interval: {entry}")
    return schedules


def build_triggers(entries: list[dict[str, Any]] | None) -> list[DeploymentEventTrigger]:
    """Deployment event triggers from YAML trigger entries."""
    triggers = []
    for entry in entries or []:
        fields = {k: v for k, v in entry.items() if k != "type"}
        if entry.get("type", "event") != "event":
            raise ValueError(f"only event triggers are supported, got {entry.get('type')}")
        triggers.append(DeploymentEventTrigger(**fields))
    return triggers


def build_deployments(path: Path = PREFECT_YAML) -> list[Any]:
    """Runner deployments equivalent to the YAML file's.

    Args:
        path: The ``prefect.yaml``.

    Returns:
        Deployments ready for :func:`prefect.serve`.
    """
    deployments = []
    for entry in load_definitions(path):
        flow = load_entrypoint(entry["entrypoint"])
        deployment = flow.to_deployment(
            name=entry["name"],
            description=entry.get("description"),
            tags=entry.get("tags"),
            parameters=entry.get("parameters"),
            schedules=build_schedules(entry.get("schedules")),
            triggers=build_triggers(entry.get("triggers")),
            concurrency_limit=entry.get("concurrency_limit"),
        )
        deployments.append(deployment)
    return deployments


def replace_pool_deployments(deployments: list[Any]) -> list[str]:
    """Delete the work-pool deployments that serving these would otherwise update in place.

    Serving updates a deployment of the same name in place, sending only the fields it set: a
    deployment first created by ``prefect deploy`` would keep its work pool and lose its pull steps
    without gaining a code location, and every run would crash ("Downloading flow code from storage
    at None"). Such a deployment is deleted first with the automations of its triggers (its flow runs
    stay in the history), so serving creates both afresh. ``prefect deploy`` after ``padim serve``
    needs nothing: it sets every field.

    Args:
        deployments: The runner deployments about to be served.

    Returns:
        The full names (``flow/deployment``) of the deployments deleted.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    replaced = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            full_name = f"{deployment.flow_name}/{deployment.name}"
            try:
                existing = client.read_deployment_by_name(full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name or existing.pull_steps:
                client.delete_resource_owned_automations(f"prefect.deployment.{existing.id}")  # its triggers
                client.delete_deployment(existing.id)
                replaced.append(full_name)
    return replaced


def serve_all(limit: int | None = None) -> None:
    """Serve every deployment until interrupted.

    Args:
        limit: Most flow runs at once.
    """
    from prefect import serve

    deployments = build_deployments()
    for full_name in replace_pool_deployments(deployments):
        print(f"{full_name}: its work-pool deployment is replaced by a served one (`prefect deploy` routes it back)")
    serve(*deployments, limit=limit)


if __name__ == "__main__":
    serve_all()
