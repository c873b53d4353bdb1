"""The deployments of ``deployments/prefect.yaml`` load, and their schedules and triggers are valid.

No Prefect server is needed: the runner deployments ``padim serve`` builds are inspected, the
retrain triggers are converted to server-side automations, matched against the events the flows
emit and their parameter templates rendered and validated against the retrain flow.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import subprocess
import sys
import uuid
import zoneinfo
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from padim_prefect.deployments.serve import PREFECT_YAML, build_deployments, load_definitions, load_entrypoint
from padim_prefect.flows.retrain import retrain
from padim_prefect.tasks.events import DRIFT_DETECTED, NORMAL_IMAGES_ADDED, product_resource

ROOT = Path(__file__).resolve().parents[1]
ACCEPTANCE = (ROOT / ".." / "shared" / "acceptance" / "deployments_check.py").resolve()
EXPECTED = {"nightly", "retrain", "watch", "train", "score"}


@pytest.fixture(scope="module")
def deployments() -> dict[str, Any]:
    """The runner deployments, by name."""
    built = build_deployments()
    assert len(built) == len({d.name for d in built}), "duplicate deployment names"
    return {d.name: d for d in built}


def server_event(event: str, product: str, payload: dict[str, Any]) -> Any:
    """An event as the Prefect server receives it from the padim tasks."""
    from prefect.events import Event
    from prefect.server.events.schemas.events import Event as ServerEvent

    emitted = Event(event=event, resource=product_resource(product), payload=payload)
    return ServerEvent.model_validate(emitted.model_dump(mode="json")).receive()


def server_automation(deployment: Any, trigger: Any) -> Any:
    """A deployment trigger as the server stores it (validates its templates)."""
    from prefect.server.events.schemas.automations import AutomationCore

    trigger.set_deployment_id(uuid.uuid4())
    return AutomationCore.model_validate(trigger.as_automation().model_dump(mode="json"))


def render_parameters(action: Any, event: Any) -> dict[str, Any]:
    """Render a RunDeployment action's parameter templates for an event, as the server does."""
    from prefect.server.utilities.user_templates import render_user_template_sync

    return {k: render_user_template_sync(v, {"event": event}) for k, v in (action.parameters or {}).items()}


def next_runs(schedule: Any, n: int, start: datetime) -> list[datetime]:
    """The next ``n`` run times of a schedule, computed by the server's schedule model."""
    from prefect.server.schemas import schedules

    server_type = {"CronSchedule": schedules.CronSchedule, "IntervalSchedule": schedules.IntervalSchedule}
    server = server_type[type(schedule).__name__].model_validate(schedule.model_dump(mode="json"))
    return list(asyncio.run(server.get_dates(n=n, start=start)))


def test_every_deployment_loads_with_its_flow(deployments: dict[str, Any]) -> None:
    assert set(deployments) == EXPECTED
    for entry in load_definitions():
        flow = load_entrypoint(entry["entrypoint"])
        deployment = deployments[entry["name"]]
        assert deployment.flow_name == flow.name
        assert entry["work_pool"]["name"] == "padim-process"
        parameters = entry.get("parameters") or {}
        assert set(parameters) <= set(inspect.signature(flow.fn).parameters)
        if entry.get("schedules"):  # a scheduled run has nobody to supply a required parameter
            flow.validate_parameters(parameters)
        assert (ROOT / entry["entrypoint"].partition(":")[0]).is_file()


def test_nightly_runs_on_a_cron_schedule_with_a_time_zone(deployments: dict[str, Any]) -> None:
    nightly = deployments["nightly"]
    assert nightly.concurrency_limit == 1
    assert len(nightly.schedules) == 1
    schedule = nightly.schedules[0].schedule
    assert schedule.timezone in zoneinfo.available_timezones()
    assert nightly.schedules[0].active
    zone = zoneinfo.ZoneInfo(schedule.timezone)
    for start in (datetime(2026, 3, 27, tzinfo=timezone.utc), datetime(2026, 10, 23, tzinfo=timezone.utc)):
        # across a switch to and from summer time: exactly one run per local night
        days = [r.astimezone(zone).date() for r in next_runs(schedule, 4, start)]
        assert [(b - a).days for a, b in itertools.pairwise(days)] == [1, 1, 1], days
    assert nightly.parameters == {"days_ago": 1}  # a run after midnight scores the day before


def test_watch_runs_on_an_interval(deployments: dict[str, Any]) -> None:
    watch = deployments["watch"]
    assert watch.concurrency_limit == 1
    assert len(watch.schedules) == 1
    interval = watch.schedules[0].schedule.interval
    assert 0 < interval.total_seconds() <= 3600
    runs = next_runs(watch.schedules[0].schedule, 2, datetime(2026, 11, 26, tzinfo=timezone.utc))
    assert runs[1] - runs[0] == interval
    assert not deployments["train"].schedules and not deployments["score"].schedules


def test_retrain_triggers_fire_on_the_events_the_flows_emit(deployments: dict[str, Any]) -> None:
    redeploy = deployments["retrain"]
    assert redeploy.concurrency_limit == 1
    automations = {next(iter(t.expect)): server_automation(redeploy, t) for t in redeploy.triggers}
    assert set(automations) == {NORMAL_IMAGES_ADDED, DRIFT_DETECTED}
    parameters = set(inspect.signature(retrain.fn).parameters)

    added = server_event(NORMAL_IMAGES_ADDED, "bottle", {"batch": "b1", "batch_url": "s3://l/b1", "n_images": 3})
    drift = server_event(DRIFT_DETECTED, "bottle", {"reasons": ["anomaly rate 40% above the bound 5%"]})
    for name, event in ((NORMAL_IMAGES_ADDED, added), (DRIFT_DETECTED, drift)):
        automation = automations[name]
        trigger = automation.trigger
        assert trigger.covers(event), f"{name} does not fire its trigger"
        other = drift if event is added else added
        assert not trigger.covers(other), f"{other.event} fires the {name} trigger"
        assert trigger.bucketing_key(event) == ("bottle",)  # one bucket (and run) per product
        assert trigger.bucketing_key(server_event(name, "cap", event.payload)) == ("cap",)
        (action,) = automation.actions
        assert set(action.parameters) <= parameters
        rendered = render_parameters(action, event)
        assert rendered["product"] == "bottle" and rendered["reason"] == name
        retrain.validate_parameters(rendered)
    assert render_parameters(automations[NORMAL_IMAGES_ADDED].actions[0], added)["normal_url"] == "s3://l/b1"


def test_yaml_meets_the_acceptance_check() -> None:
    """The same checks as ``shared/acceptance/deployments_check.py``, on the YAML itself."""
    deps = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    schedules = [s for d in deps for s in d.get("schedules") or []]
    assert any(s.get("cron") and s.get("timezone") for s in schedules)
    assert any(s.get("interval") for s in schedules)
    events = {e for d in deps for t in d.get("triggers") or [] for e in t.get("expect") or []}
    assert {NORMAL_IMAGES_ADDED, DRIFT_DETECTED} <= events
    assert all(":" in d.get("entrypoint", "") for d in deps)


@pytest.mark.skipif(not ACCEPTANCE.is_file(), reason=f"acceptance script not found at {ACCEPTANCE}")
def test_acceptance_script_passes() -> None:
    done = subprocess.run(
        [sys.executable, str(ACCEPTANCE)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cron with tz, triggers on both events, watch interval" in done.stdout


@pytest.mark.parametrize("value", [None, "/nonexistent/padim-project"])
def test_a_worker_without_the_project_dir_fails_naming_the_variable(
    value: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The pull steps check PADIM_PROJECT_DIR before changing into it (a worker without it names it)."""
    from prefect.deployments.steps.utility import run_shell_script

    pull = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))["pull"]
    check = next(
        step["prefect.deployments.steps.run_shell_script"]
        for step in pull
        if "prefect.deployments.steps.run_shell_script" in step
    )
    kwargs = {k: v for k, v in check.items() if k != "id"}
    if value is None:
        monkeypatch.delenv("PADIM_PROJECT_DIR", raising=False)
    else:
        monkeypatch.setenv("PADIM_PROJECT_DIR", value)
    with pytest.raises(RuntimeError, match="PADIM_PROJECT_DIR is not set to the project folder"):
        asyncio.run(run_shell_script(**kwargs))
    monkeypatch.setenv("PADIM_PROJECT_DIR", str(tmp_path))
    asyncio.run(run_shell_script(**kwargs))
    assert list(pull[-1]) == ["prefect.deployments.steps.set_working_directory"]
