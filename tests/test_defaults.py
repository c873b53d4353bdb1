"""Every default a user is told agrees with the one place it is defined.

The defaults live in ``padim/settings.py`` (:class:`TrainSettings`, :class:`ScoreSettings`,
:class:`RunnerSettings`, :data:`CPU_BATCH_SIZE`) and ``padim/core/config.py`` (:class:`PadimConfig`,
:data:`DEFAULT_CHANNELS`). These tests fail when ``--help``, the command line's own defaults, the
flows' signatures, the README, ``docs/*.md``, the comments of ``deployments/prefect.yaml`` or the
documented environment variables say something else. The expected text is computed from the
settings, so changing a default without changing the docs fails here.
"""

from __future__ import annotations

import inspect
import io
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import fsspec
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from padim.core.backbones import BACKBONES
from padim.core.config import DEFAULT_CHANNELS, PadimConfig
from padim.evaluation.synthetic import make_demo_dataset
from padim.jobs.inspection import check_drift
from padim.jobs.training import plan_training
from padim.settings import (
    CPU_BATCH_SIZE,
    GateSettings,
    ProposalSettings,
    RetentionSettings,
    RunnerSettings,
    ScoreSettings,
    TrainSettings,
    WatchSettings,
    default_of,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"

SETTINGS_MODELS: dict[str, type[BaseModel]] = {
    "PadimConfig": PadimConfig,
    "TrainSettings": TrainSettings,
    "ScoreSettings": ScoreSettings,
    "RunnerSettings": RunnerSettings,
    "WatchSettings": WatchSettings,
    "GateSettings": GateSettings,
    "RetentionSettings": RetentionSettings,
    "ProposalSettings": ProposalSettings,
}

# ---- helpers --------------------------------------------------------------------------------


def pct(value: float) -> str:
    """A share as the docs write it: ``0.2`` -> ``"20 %"``, ``0.001`` -> ``"0.1 %"``."""
    return f"{value * 100:g} %"


def flat(text: str) -> str:
    """Text with every run of whitespace (line breaks included) collapsed to one space."""
    return " ".join(text.split())


def read_flat(path: Path) -> str:
    """A file's text with its whitespace collapsed (so a phrase may wrap across lines)."""
    return flat(path.read_text(encoding="utf-8"))


def drift_rate_bound() -> tuple[float, float]:
    """The factor and the floor of the default anomaly-rate drift bound, measured on ``check_drift``.

    Returns:
        ``(factor, floor)`` with bound ``max(factor x image FPR, floor)``.
    """
    settings = ScoreSettings()
    floor = check_drift([], 1e-9, None, settings).max_anomaly_rate
    factor = check_drift([], 0.5, None, settings).max_anomaly_rate / 0.5
    return factor, floor


def drift_rate_text() -> str:
    """How the docs state the default anomaly-rate drift bound."""
    rate = default_of(ScoreSettings, "drift_max_anomaly_rate")
    if rate is not None:
        return pct(rate)
    factor, floor = drift_rate_bound()
    return f"max({factor:g} x the calibrated image FPR, {pct(floor)})"


def demo_counts() -> tuple[int, int]:
    """Training images of ``padim demo`` and how many of them the default plan holds out."""
    n_train = inspect.signature(make_demo_dataset).parameters["n_train"].default
    plan = plan_training([f"/demo/train/good/{i:03d}.png" for i in range(n_train)], TrainSettings())
    return n_train, len(plan.holdout)


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row in ``text`` (separator rows left out)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|") and not re.fullmatch(r"\|[-| :]+\|", line):
            rows.append([cell.strip() for cell in line[1:-1].split("|")])
    return rows


def first_number(cell: str) -> float | None:
    """The first number of a table cell, a percentage as a share (``"20 %"`` -> ``0.2``)."""
    match = re.search(r"(\d+(?:\.\d+)?)( ?%)?", cell)
    if match is None:
        return None
    value = float(match.group(1))
    return value / 100 if match.group(2) else value


# ---- --help ---------------------------------------------------------------------------------

HELP_MODELS: dict[str, tuple[type[BaseModel], ...]] = {
    "train": (PadimConfig, TrainSettings),
    "evaluate": (PadimConfig, TrainSettings),
    "retrain": (TrainSettings,),
    "score": (ScoreSettings,),
    "propose": (PadimConfig, TrainSettings, ProposalSettings),
}
"""Which settings models give the defaults of each command's options."""

OPTION_FIELDS = {"--crop": "crop_size"}
"""Options whose settings field is not the option name with ``-`` as ``_``."""

REQUIRED_HELP_DEFAULTS: dict[str, set[str]] = {
    "train": {
        "--backbone",
        "--image-size",
        "--device",
        "--holdout-fraction",
        "--image-fpr",
        "--pixel-fpr",
        "--max-skipped-fraction",
        "--shard-size",
    },
    "evaluate": {"--backbone", "--image-size", "--device", "--holdout-fraction", "--image-fpr", "--pixel-fpr"},
    "retrain": {"--device", "--shard-size"},
    "score": {"--device", "--shard-size"},
    "propose": {"--backbone", "--image-size", "--device", "--holdout-fraction", "--defects-per-image"},
}
"""Options whose ``[default: X]`` must be shown and checked (so the check cannot become empty)."""

_OPTION_START = re.compile(r"^  (?:-\w, )?(--[a-z][a-z0-9-]*)")
_DEFAULT_SHOWN = re.compile(r"\[default: ([^;\]]+)[;\]]")


def option_entries(help_text: str) -> dict[str, str]:
    """Each long option of a help screen with its whole help entry, unwrapped.

    Args:
        help_text: Output of ``padim <command> --help``.

    Returns:
        ``{"--image-size": "--image-size N Side ... [default: 224; 32<=x<=2048]", ...}``.
    """
    entries: dict[str, str] = {}
    current = None
    in_options = False
    for line in help_text.splitlines():
        if line.startswith("Options:"):
            in_options = True
            continue
        if not in_options:
            continue
        match = _OPTION_START.match(line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line
    return {name: flat(entry) for name, entry in entries.items()}


def same_value(shown: str, default: object) -> bool:
    """Whether a ``[default: X]`` shows exactly ``default``."""
    if isinstance(default, bool):
        return shown.lower() == str(default).lower()
    if isinstance(default, int | float):
        try:
            return type(default)(shown) == default
        except ValueError:
            return False
    return shown == str(default)


@pytest.fixture(scope="module")
def help_screens() -> dict[str, str]:
    """``padim <command> --help`` of the commands with settings defaults, in a wide terminal."""
    env = {**os.environ, "COLUMNS": "200"}
    screens = {}
    for command in HELP_MODELS:
        result = subprocess.run(
            [sys.executable, "-m", "padim_cli.main", command, "--help"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"padim {command} --help failed: {result.stderr}"
        screens[command] = result.stdout
    return screens


@pytest.mark.parametrize("command", list(HELP_MODELS))
def test_help_shows_the_settings_defaults(help_screens: dict[str, str], command: str) -> None:
    """Every option named like a settings field shows that field's default, exactly."""
    entries = option_entries(help_screens[command])
    checked = set()
    for option, entry in entries.items():
        field = OPTION_FIELDS.get(option, option[2:].replace("-", "_"))
        model = next((m for m in HELP_MODELS[command] if field in m.model_fields), None)
        if model is None:
            continue
        default = default_of(model, field)
        if default is None:  # "pick for me" defaults are explained in words, see below
            continue
        shown = _DEFAULT_SHOWN.search(entry)
        assert shown, f"padim {command} --help shows no default for {option}; expected {default!r}: {entry}"
        assert same_value(shown.group(1).strip(), default), (
            f"padim {command} --help shows {option} [default: {shown.group(1)}], "
            f"but {model.__name__}.{field} is {default!r}"
        )
        checked.add(option)
    missing = REQUIRED_HELP_DEFAULTS[command] - checked
    assert not missing, f"padim {command} --help: no settings default checked for {sorted(missing)}"


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_help_explains_the_model_defaults_in_words(help_screens: dict[str, str], command: str) -> None:
    """--channels names every backbone's d, --crop and --no-crop say no crop, hold-out its minimum."""
    entries = option_entries(help_screens[command])
    for backbone, d in DEFAULT_CHANNELS.items():
        assert f"{d} for {backbone}" in entries["--channels"], (
            f"padim {command} --help --channels should name DEFAULT_CHANNELS[{backbone!r}] = {d}: "
            f"{entries['--channels']}"
        )
    assert default_of(PadimConfig, "crop_size") is None, "PadimConfig now crops by default: update --crop's help"
    assert "Default: no crop" in entries["--crop"], entries["--crop"]
    assert "(the default)" in entries["--no-crop"], entries["--no-crop"]
    min_holdout = default_of(TrainSettings, "min_holdout")
    assert f"at least {min_holdout} images" in entries["--holdout-fraction"], (
        f"--holdout-fraction should state TrainSettings.min_holdout = {min_holdout}: {entries['--holdout-fraction']}"
    )


@pytest.mark.parametrize("command", list(HELP_MODELS))
def test_help_names_the_cpu_batch_size(help_screens: dict[str, str], command: str) -> None:
    """--batch-size (default: pick one for the device) names CPU_BATCH_SIZE."""
    entry = option_entries(help_screens[command])["--batch-size"]
    assert f"Default: {CPU_BATCH_SIZE} on a CPU" in entry, f"padim {command} --batch-size: {entry}"


@pytest.mark.parametrize("command", ["train", "score"])
def test_help_names_the_dask_workers_default(help_screens: dict[str, str], command: str) -> None:
    """--dask-workers names RunnerSettings.dask_workers."""
    entry = option_entries(help_screens[command])["--dask-workers"]
    workers = default_of(RunnerSettings, "dask_workers")
    assert f"(default {workers})" in entry, f"padim {command} --dask-workers should say default {workers}: {entry}"


# ---- flow signatures --------------------------------------------------------------------------


def flow_function(name: str) -> Callable[..., Any]:
    """The Python function of the flow ``padim_prefect.flows.<name>.<name>``."""
    module = __import__(f"padim_prefect.flows.{name}", fromlist=[name])
    return getattr(module, name).fn


FLOW_MODELS: dict[str, tuple[type[BaseModel], ...]] = {
    "train": (PadimConfig, TrainSettings),
    "score": (ScoreSettings,),
    "retrain": (TrainSettings,),
    "nightly": (ScoreSettings,),
    "watch": (WatchSettings,),
}


@pytest.mark.parametrize("name", list(FLOW_MODELS))
def test_flow_parameter_defaults_are_the_settings_defaults(name: str) -> None:
    """Every flow parameter named like a settings field defaults to that field's default."""
    parameters = inspect.signature(flow_function(name)).parameters
    checked = []
    for parameter in parameters.values():
        for model in FLOW_MODELS[name]:
            if parameter.name in model.model_fields:
                expected = default_of(model, parameter.name)
                assert parameter.default is not inspect.Parameter.empty, (
                    f"flow {name}: parameter {parameter.name} has no default; {model.__name__} says {expected!r}"
                )
                assert parameter.default == expected, (
                    f"flow {name}: {parameter.name} defaults to {parameter.default!r}, "
                    f"{model.__name__}.{parameter.name} is {expected!r}"
                )
                checked.append(parameter.name)
    assert checked, f"flow {name}: no parameter was compared with the settings ({list(parameters)})"


def test_train_flow_defaults_build_the_default_configuration() -> None:
    """A train-flow run with no options fits PadimConfig() with TrainSettings()."""
    from padim_prefect.flows.params import build_config

    parameters = inspect.signature(flow_function("train")).parameters
    config_args = inspect.signature(build_config).parameters
    config = build_config(**{k: parameters[k].default for k in config_args if k in parameters})
    assert config == PadimConfig(), f"train flow defaults give {config}, not PadimConfig() = {PadimConfig()}"
    settings = TrainSettings(**{k: p.default for k, p in parameters.items() if k in TrainSettings.model_fields})
    assert settings == TrainSettings(), f"train flow defaults give {settings}, not {TrainSettings()}"


# ---- the command line with no options ------------------------------------------------------------


class FlowCalledError(Exception):
    """Raised by the stand-in of ``run_flow``: the command got as far as starting a flow."""


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """Put ``os.environ`` back after a CLI run (``padim``'s callback sets Prefect variables)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def flow_calls(monkeypatch: pytest.MonkeyPatch, restored_environ: None) -> list[tuple[str, dict[str, Any]]]:
    """The flows the CLI would run, with their parameters; no backbone, model or Prefect needed."""
    from padim_cli.commands import score, train

    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_run_flow(name: str, dask: str | None = None, dask_workers: int | None = None, **parameters: Any) -> Any:
        calls.append((name, parameters))
        raise FlowCalledError(name)

    fakes = {
        "run_flow": fake_run_flow,
        "check_backbone": lambda *args, **kwargs: None,
        "check_model": lambda *args, **kwargs: "v1",
    }
    for module in (train, score):
        for name, fake in fakes.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fake)
    return calls


def invoke_until_flow(args: list[str], calls: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Run ``padim ARGS`` up to the flow call and return the flow's parameters."""
    from padim_cli.main import app

    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, FlowCalledError), (
        f"padim {' '.join(args)}: {result.output} {result.exception!r}"
    )
    assert len(calls) == 1
    return calls[0][1]


EXPLICIT: dict[str, set[str]] = {
    "train": {"product", "normal_url", "store"},
    "score": {"product", "images_url", "store"},
    "retrain": {"product", "store"},
    "nightly": {"store"},
    "watch": {"store"},
}
"""Flow parameters the test below gives on the command line, per command."""


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("train", ["--product", "bottle", "--normal", "{tmp}"]),
        ("score", ["--product", "bottle", "--images", "{tmp}"]),
        ("retrain", ["--product", "bottle"]),
        ("nightly", []),
        ("watch", []),
    ],
)
def test_cli_without_options_runs_the_flow_with_its_own_defaults(
    flow_calls: list[tuple[str, dict[str, Any]]], tmp_path: Path, command: str, args: list[str]
) -> None:
    """``padim <command>`` with no options passes the flow exactly its signature's defaults."""
    argv = [command, *[a.replace("{tmp}", str(tmp_path)) for a in args], "--store", str(tmp_path / "store")]
    passed = invoke_until_flow(argv, flow_calls)
    parameters = inspect.signature(flow_function(command)).parameters
    compared = []
    for name, value in passed.items():
        assert name in parameters, f"padim {command} passes {name}, which flow {command} does not take"
        if name in EXPLICIT[command]:
            continue
        default = parameters[name].default
        assert default is not inspect.Parameter.empty, f"flow {command}: {name} has no default"
        assert value == default, f"padim {command} passes {name}={value!r}; flow {command} defaults to {default!r}"
        compared.append(name)
    assert compared, f"padim {command}: nothing compared ({sorted(passed)})"
    if command != "watch":
        assert "device" in compared, f"padim {command} does not pass its --device default to the flow"


def test_padim_train_without_options_builds_the_default_configuration(
    flow_calls: list[tuple[str, dict[str, Any]]], tmp_path: Path
) -> None:
    """``padim train`` with no options fits PadimConfig() with TrainSettings()."""
    from padim_prefect.flows.params import build_config

    passed = invoke_until_flow(
        ["train", "--product", "bottle", "--normal", str(tmp_path), "--store", str(tmp_path / "s")], flow_calls
    )
    config = build_config(**{k: passed[k] for k in inspect.signature(build_config).parameters if k in passed})
    assert config == PadimConfig(), f"padim train builds {config}, not PadimConfig() = {PadimConfig()}"
    settings = TrainSettings(**{k: v for k, v in passed.items() if k in TrainSettings.model_fields})
    assert settings == TrainSettings(), f"padim train runs with {settings}, not {TrainSettings()}"


def test_padim_score_without_options_uses_the_default_score_settings(
    flow_calls: list[tuple[str, dict[str, Any]]], tmp_path: Path
) -> None:
    """``padim score`` with no options scores with ScoreSettings() (heat maps included)."""
    passed = invoke_until_flow(
        ["score", "--product", "bottle", "--images", str(tmp_path), "--store", str(tmp_path / "s")], flow_calls
    )
    settings = ScoreSettings(**{k: v for k, v in passed.items() if k in ScoreSettings.model_fields})
    assert settings == ScoreSettings(), f"padim score runs with {settings}, not {ScoreSettings()}"


def test_padim_evaluate_without_options_uses_the_default_configuration(
    monkeypatch: pytest.MonkeyPatch, restored_environ: None, tmp_path: Path
) -> None:
    """``padim evaluate DIR`` fits PadimConfig() and calibrates with TrainSettings()."""
    import padim_cli.commands.evaluate
    from padim_cli.main import app

    seen: dict[str, Any] = {}

    def fake_evaluation(dataset_dir: str, config: PadimConfig, settings: TrainSettings, **kwargs: Any) -> None:
        seen.update(config=config, settings=settings)

    monkeypatch.setattr(padim_cli.commands.evaluate, "run_evaluation", fake_evaluation)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 0, f"padim evaluate: {result.output} {result.exception!r}"
    assert seen["config"] == PadimConfig(), f"padim evaluate fits {seen['config']}, not {PadimConfig()}"
    assert seen["settings"] == TrainSettings(), f"padim evaluate calibrates with {seen['settings']}"


def test_cli_signature_defaults_are_the_settings_defaults() -> None:
    """Every CLI parameter named like a settings field defaults to it (enums by value)."""
    from padim_cli.main import COMMANDS

    functions = {function.__name__: function for function in COMMANDS}
    models = {**HELP_MODELS, "nightly": (ScoreSettings,), "demo": (TrainSettings,)}
    for command, command_models in models.items():
        for parameter in inspect.signature(functions[command]).parameters.values():
            field = {"crop": "crop_size"}.get(parameter.name, parameter.name)
            for model in command_models:
                if field in model.model_fields:
                    value = parameter.default.value if isinstance(parameter.default, Enum) else parameter.default
                    if isinstance(value, list):  # a repeatable option: its values, in order
                        value = tuple(item.value if isinstance(item, Enum) else item for item in value)
                    expected = default_of(model, field)
                    assert value == expected, (
                        f"padim {command} {parameter.name} defaults to {value!r}, "
                        f"{model.__name__}.{field} is {expected!r}"
                    )


# ---- README and docs ----------------------------------------------------------------------------


def readme_phrases() -> list[tuple[str, str]]:
    """``(what, phrase)`` the README must contain, computed from the settings."""
    train, score, runner, config = TrainSettings(), ScoreSettings(), RunnerSettings(), PadimConfig()
    size = config.image_size
    crop = "no crop" if config.crop_size is None else f"centre crop {config.crop_size}"
    n_demo, n_demo_holdout = demo_counts()
    return [
        ("image FPR of the demo", f"target: {pct(train.image_fpr)} false alarms"),
        (
            "hold-out share and minimum",
            f"Training holds {pct(train.holdout_fraction)} of the images out (at least {train.min_holdout}; "
            "`--holdout-fraction`)",
        ),
        (
            "image and pixel FPR",
            f"({pct(train.image_fpr)} of good images for the image decision, `--image-fpr`; "
            f"{pct(train.pixel_fpr)} of good pixels",
        ),
        ("skipped-image limit", f"When more than {pct(train.max_skipped_fraction)} of the listed images cannot"),
        ("image size and crop", f"the whole image resized to {size} x {size} ({crop}"),
        ("default channels", f"all {DEFAULT_CHANNELS[config.backbone]} feature channels"),
        ("CPU batch size", f"`--batch-size` ({CPU_BATCH_SIZE} images on a CPU"),
        ("train shard size", f"`--shard-size` ({train.shard_size} images per fit task)"),
        ("score shard size", f"sets the images per score task ({score.shard_size})"),
        (
            "shard sizes (Dask)",
            f"(`--shard-size`: {train.shard_size} images per fit task, {score.shard_size} per score task)",
        ),
        ("task threads", f"run on a pool of {runner.task_threads} threads (`PADIM_TASK_THREADS`)"),
        ("Dask workers", f"starts a local cluster of {runner.dask_workers} worker processes"),
        ("drift anomaly rate", f"an anomaly share above {drift_rate_text()}"),
        ("drift median ratio", f"a median score above {score.drift_max_median_ratio:g} x the held-out images' median"),
        ("drift minimum images", f"a night with fewer than {score.drift_min_images} scored images is not judged"),
        ("demo training images", f"Data set: {n_demo} good images to train on"),
        ("demo hold-out", f"{n_demo} images ({n_demo_holdout} first held out to calibrate)"),
        ("where defaults live", "[padim/settings.py](padim/settings.py)"),
        ("where defaults live", "[padim/core/config.py](padim/core/config.py)"),
    ]


def architecture_phrases() -> list[tuple[str, str]]:
    """``(what, phrase)`` docs/architecture.md must contain, computed from the settings."""
    train, score, config = TrainSettings(), ScoreSettings(), PadimConfig()
    spec = BACKBONES[config.backbone]
    grid = config.input_size // spec.strides[0]
    radius = int(4.0 * config.blur_sigma + 0.5)
    micro = sorted(s.cpu_micro_batch for s in BACKBONES.values())
    return [
        (
            "train plan",
            f"hold out {pct(train.holdout_fraction)} (≥ {train.min_holdout}) for calibration, "
            f"shard the rest ({train.shard_size} per task)",
        ),
        ("score shards", f"shards ({score.shard_size})"),
        ("embedding grid", f"embedding (B, d, {grid}, {grid})"),
        ("blur", f"blur (σ {config.blur_sigma:g}, kernel {2 * radius + 1})"),
        ("CPU micro-batches", f"micro-batches of {micro[0]}-{micro[-1]}"),
        ("CPU batch size", f"one call of {CPU_BATCH_SIZE})"),
        ("where defaults live", "`padim/settings.py`, `padim/core/config.py`"),
        ("settings module", "| (top) | `settings.py` |"),
    ]


@pytest.mark.parametrize(("what", "phrase"), [pytest.param(*p, id=p[0]) for p in readme_phrases()])
def test_readme_states_the_defaults(what: str, phrase: str) -> None:
    """The README quotes each default as the settings define it."""
    assert flat(phrase) in read_flat(README), f"README.md should say ({what}): {phrase!r}"


@pytest.mark.parametrize(("what", "phrase"), [pytest.param(*p, id=p[0]) for p in architecture_phrases()])
def test_architecture_states_the_defaults(what: str, phrase: str) -> None:
    """docs/architecture.md quotes each default as the settings define it."""
    assert flat(phrase) in read_flat(DOCS / "architecture.md"), f"docs/architecture.md should say ({what}): {phrase!r}"


def test_readme_first_screen_keeps_its_two_commands() -> None:
    """Before the first picture the README shows exactly the demo and the test command."""
    head = README.read_text(encoding="utf-8").split("![", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", head, flags=re.S)
    assert [b.strip().rsplit("&& ", 1)[-1] for b in blocks] == [".venv/bin/padim demo", ".venv/bin/python -m pytest"]


def test_readme_backbone_table_gives_each_default_d() -> None:
    """Each backbone's row names its DEFAULT_CHANNELS value and its channel count."""
    rows = {row[0].strip("`").split("`")[0]: row for row in markdown_rows(README.read_text(encoding="utf-8"))}
    for name, d in DEFAULT_CHANNELS.items():
        assert name in rows, f"README.md backbone table has no row for {name}"
        taps, default_d = rows[name][1], rows[name][2]
        total = BACKBONES[name].total_channels
        assert f"({total} channels)" in taps, f"README.md: {name} has {total} channels, row says {taps!r}"
        assert first_number(default_d) == d, f"README.md: default d of {name} is {d}, row says {default_d!r}"
        assert ("(all)" in default_d) == (d == total), f"README.md: {name} row says {default_d!r} of {total}"


def test_reports_doc_quotes_the_score_shard_size() -> None:
    """Any 'shards of N images' in docs/reports.md is the score flow's shard size."""
    quoted = re.findall(r"shards of ([\d,]+) images", read_flat(DOCS / "reports.md"))
    expected = default_of(ScoreSettings, "shard_size")
    assert all(int(n.replace(",", "")) == expected for n in quoted), f"reports.md says {quoted}, expected {expected}"


# ---- the README's table of defaults ------------------------------------------------------------

_FIELD_REF = re.compile(
    r"`(PadimConfig|TrainSettings|ScoreSettings|RunnerSettings|WatchSettings|GateSettings|RetentionSettings"
    r"|ProposalSettings)\.(\w+)`"
)

NOT_IN_DEFAULTS_TABLE = {
    ("TrainSettings", "calibration_url"),  # a folder per run, its absence is the hold-out
    ("TrainSettings", "seed"),  # reproducibility, not a knob
    ("TrainSettings", "path"),  # implementation choice (same numbers)
    ("ScoreSettings", "path"),
}
REQUIRED_CONFIG_FIELDS = {("PadimConfig", f) for f in ("backbone", "channels", "image_size", "crop_size")}


def describe_none_default(field: str) -> Callable[[str], bool] | None:
    """How the defaults table must explain a ``None`` ("decide for me") default."""
    rules: dict[str, Callable[[str], bool]] = {
        "channels": lambda cell: all(f"{d}" in cell and name in cell for name, d in DEFAULT_CHANNELS.items()),
        "batch_size": lambda cell: f"{CPU_BATCH_SIZE} on a CPU" in cell,
        "crop_size": lambda cell: cell.startswith("none"),
        "drift_max_anomaly_rate": lambda cell: cell == drift_rate_text(),
    }
    return rules.get(field)


def check_table_cell(model: type[BaseModel], field: str, cell: str) -> None:
    """Assert that a default-value cell of the README's defaults table states ``model.field``."""
    default = default_of(model, field)
    where = f"README.md defaults table, {model.__name__}.{field} ({default!r})"
    if default is None:
        rule = describe_none_default(field)
        assert rule is not None, f"{where}: no rule to check how a None default is described"
        assert rule(cell), f"{where}: {cell!r} does not describe it"
    elif isinstance(default, bool):
        assert cell == ("on" if default else "off"), f"{where}: says {cell!r}"
    elif isinstance(default, tuple):  # a list of names, in order
        assert re.findall(r"`(\w+)`", cell) == list(default), f"{where}: says {cell!r}"
    elif isinstance(default, str):
        assert re.match(rf"`{re.escape(default)}`", cell), f"{where}: says {cell!r}"
    else:
        value = first_number(cell)
        assert value is not None and math.isclose(value, default), f"{where}: says {cell!r}"


def test_readme_defaults_table_agrees_with_the_settings() -> None:
    """Every row of the README's defaults table states its fields' defaults; no field is left out."""
    documented = set()
    for row in markdown_rows(README.read_text(encoding="utf-8")):
        refs = _FIELD_REF.findall(row[-1])
        if not refs:
            continue
        for model_name, field in refs:
            model = SETTINGS_MODELS[model_name]
            assert field in model.model_fields, f"README.md names {model_name}.{field}, which does not exist"
            check_table_cell(model, field, row[1])
            documented.add((model_name, field))
    expected = {
        (name, field)
        for name in SETTINGS_MODELS
        if name != "PadimConfig"
        for field in SETTINGS_MODELS[name].model_fields
    } - NOT_IN_DEFAULTS_TABLE
    missing = (expected | REQUIRED_CONFIG_FIELDS) - documented
    assert not missing, f"README.md's defaults table lacks {sorted(missing)}"


# ---- environment variables -------------------------------------------------------------------------

SOURCE_DIRS = ("padim", "padim_cli", "flows", "tasks", "deployments")


def env_variables_in_sources() -> set[str]:
    """Every ``PADIM_*`` name in the code and the deployment file."""
    names = set()
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".yaml", ".yml"}:
                names |= set(re.findall(r"\bPADIM_[A-Z_]*[A-Z]\b", path.read_text(encoding="utf-8")))
    return names


def readme_env_table() -> dict[str, list[str]]:
    """The README's environment-variable table: variable -> its row's cells."""
    rows = markdown_rows(README.read_text(encoding="utf-8"))
    return {row[0].strip("`"): row for row in rows if re.fullmatch(r"`PADIM_[A-Z_]+`", row[0])}


def test_every_environment_variable_is_documented() -> None:
    """Each PADIM_* variable the code reads has a row in the README's table."""
    used = env_variables_in_sources()
    assert {"PADIM_STORE", "PADIM_TASK_THREADS", "PADIM_CACHE"} <= used, f"source scan found only {used}"
    missing = used - set(readme_env_table())
    assert not missing, f"README.md does not document {sorted(missing)}"


def test_storage_doc_agrees_with_the_readme_on_variable_defaults() -> None:
    """docs/storage.md states the same defaults for the PADIM_* variables it lists."""
    documented = readme_env_table()
    rows = markdown_rows((DOCS / "storage.md").read_text(encoding="utf-8"))
    listed = {row[0].strip("`"): row for row in rows if re.fullmatch(r"`PADIM_[A-Z_]+`", row[0])}
    assert {"PADIM_STORE", "PADIM_CACHE"} <= set(listed), f"docs/storage.md lists {sorted(listed)}"
    for name, row in listed.items():
        default = documented[name][1]
        assert f"default {default}" in row[1], f"docs/storage.md: {name} should say default {default}: {row[1]!r}"


@pytest.fixture
def clean_runner_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No task-runner variables set."""
    for name in ("PADIM_TASK_RUNNER", "PADIM_TASK_THREADS", "PADIM_DASK_WORKERS", "PADIM_DASK_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_task_runner_variables_default_as_documented(clean_runner_env: pytest.MonkeyPatch) -> None:
    """Unset: a thread pool of RunnerSettings.task_threads, as the README's table says."""
    from padim_prefect.flows.runners import task_runner_from_env
    from prefect.task_runners import ThreadPoolTaskRunner

    table = readme_env_table()
    threads = default_of(RunnerSettings, "task_threads")
    assert table["PADIM_TASK_RUNNER"][1] == "`threads`", table["PADIM_TASK_RUNNER"]
    assert first_number(table["PADIM_TASK_THREADS"][1]) == threads, table["PADIM_TASK_THREADS"]
    runner = task_runner_from_env()
    assert isinstance(runner, ThreadPoolTaskRunner), f"default task runner is {type(runner).__name__}"
    assert runner._max_workers == threads, f"default runner has {runner._max_workers} threads, not {threads}"
    clean_runner_env.setenv("PADIM_TASK_THREADS", str(threads + 1))
    assert task_runner_from_env()._max_workers == threads + 1, "PADIM_TASK_THREADS is not honoured"


def test_dask_variables_default_as_documented(clean_runner_env: pytest.MonkeyPatch) -> None:
    """PADIM_TASK_RUNNER=dask: a local cluster of RunnerSettings.dask_workers, or PADIM_DASK_ADDRESS."""
    pytest.importorskip("prefect_dask")
    from padim_prefect.flows.runners import task_runner_from_env

    table = readme_env_table()
    workers = default_of(RunnerSettings, "dask_workers")
    assert first_number(table["PADIM_DASK_WORKERS"][1]) == workers, table["PADIM_DASK_WORKERS"]
    assert table["PADIM_DASK_ADDRESS"][1].startswith("unset: a local cluster"), table["PADIM_DASK_ADDRESS"]
    clean_runner_env.setenv("PADIM_TASK_RUNNER", "dask")
    runner = task_runner_from_env()
    assert runner.address is None and runner.cluster_kwargs["n_workers"] == workers, runner.cluster_kwargs
    clean_runner_env.setenv("PADIM_DASK_ADDRESS", "tcp://scheduler:8786")
    assert task_runner_from_env().address == "tcp://scheduler:8786"


def test_store_variable_defaults_as_documented(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Unset PADIM_STORE: the store is the documented folder under the working directory."""
    from padim.io.store_layout import default_store_url

    documented = readme_env_table()["PADIM_STORE"][1].strip("`")
    monkeypatch.delenv("PADIM_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_store_url() == os.path.abspath(documented), f"README says {documented}"


def test_cache_variable_defaults_as_documented(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Remote weights files are copied under <PADIM_CACHE>/weights/, by default ~/.cache/padim."""
    from padim.core.backbones.weights import fetch_to_local

    documented = readme_env_table()["PADIM_CACHE"][1].strip("`")
    assert documented.startswith("~/"), documented
    url = "memory://padim-test-defaults/weights.pth"
    with fsspec.open(url, "wb") as f:
        f.write(b"weights")
    try:
        monkeypatch.delenv("PADIM_CACHE", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        local = fetch_to_local(url)
        assert local.parent == tmp_path / "home" / documented[2:] / "weights", local
        monkeypatch.setenv("PADIM_CACHE", str(tmp_path / "cache"))
        assert fetch_to_local(url).parent == tmp_path / "cache" / "weights"
    finally:
        fsspec.filesystem("memory").rm("/padim-test-defaults", recursive=True)


@pytest.mark.parametrize(
    ("variable", "module", "function"),
    [
        ("PADIM_VERBOSE", "padim_cli.environment", "verbose_enabled"),
        ("PADIM_DEBUG", "padim_cli.environment", "debug_enabled"),
    ],
)
def test_flag_variables_work_as_documented(
    monkeypatch: pytest.MonkeyPatch, variable: str, module: str, function: str
) -> None:
    """PADIM_VERBOSE and PADIM_DEBUG: off unless 1, true, yes or on, as the README says."""
    enabled = getattr(__import__(module, fromlist=[function]), function)
    row = readme_env_table()[variable]
    assert row[1] == "off" and "`1` (or `true`, `yes`, `on`)" in row[2], row
    monkeypatch.delenv(variable, raising=False)
    assert not enabled(), f"{variable} unset should be off"
    for value in ("1", "true", "yes", "on"):
        monkeypatch.setenv(variable, value)
        assert enabled(), f"{variable}={value} should be on"
    monkeypatch.setenv(variable, "0")
    assert not enabled(), f"{variable}=0 should be off"


class TerminalStream(io.StringIO):
    """A standard-error stand-in that says it is a terminal."""

    def isatty(self) -> bool:
        """Pretend to be a terminal."""
        return True


def test_progress_variable_works_as_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    """PADIM_PROGRESS=0 turns the bars off even on a terminal."""
    from padim.jobs import progress

    row = readme_env_table()["PADIM_PROGRESS"]
    assert row[1] == "on" and "`0` turns the progress bars off" in row[2], row
    monkeypatch.setattr(sys, "stderr", TerminalStream())
    monkeypatch.delenv("PADIM_PROGRESS", raising=False)
    assert progress.progress_enabled(), "bars should be on on a terminal by default"
    monkeypatch.setenv("PADIM_PROGRESS", "0")
    assert not progress.progress_enabled(), "PADIM_PROGRESS=0 should turn the bars off"


# ---- deployments/prefect.yaml ------------------------------------------------------------------


def test_prefect_yaml_comments_quote_the_defaults() -> None:
    """The deployment file's comments state the runner defaults and point at files that exist."""
    text = PREFECT_YAML.read_text(encoding="utf-8")
    comments = flat(" ".join(line for line in text.splitlines() if line.lstrip().startswith("#")))
    runner = RunnerSettings()
    for phrase in (
        f"PADIM_TASK_THREADS={runner.task_threads} (threads per flow run, the default)",
        f"PADIM_DASK_WORKERS={runner.dask_workers} (local Dask cluster, the default)",
        "padim/settings.py and padim/core/config.py",
    ):
        assert phrase in comments, f"deployments/prefect.yaml comments should say {phrase!r}"
    for path in re.findall(r"\b((?:docs|padim)/[\w/]+\.(?:md|py))\b", comments):
        assert (ROOT / path).is_file(), f"deployments/prefect.yaml refers to {path}, which does not exist"
