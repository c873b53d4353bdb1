"""The ``padim`` command line driven as a user would: subprocesses, exit codes, printed output.

Fast tests check the help, the option contract and the one-line errors (most fail before Prefect
starts). Slow tests run ``padim demo`` once (module fixture) and query its store, and train and
score a small model through ``padim train`` / ``padim score``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sklearn.metrics import roc_auc_score

from padim.evaluation.synthetic import make_demo_dataset
from padim.reports import REPORT_COLUMNS
from padim_cli.errors import describe_error, exit_code_for

COMMANDS = (
    "demo",
    "train",
    "score",
    "evaluate",
    "propose",
    "report",
    "models",
    "serve",
    "retrain",
    "configure",
    "nightly",
    "watch",
)
CONTRACT_FLAGS = {
    "demo": ["--workdir", "--store"],
    "train": [
        "--product",
        "--normal",
        "--store",
        "--backbone",
        "--weights",
        "--channels",
        "--image-size",
        "--crop",
        "--no-crop",
        "--batch-size",
        "--device",
        "--calibration",
        "--holdout-fraction",
        "--image-fpr",
        "--shard-size",
        "--dask",
    ],
    "score": ["--product", "--images", "--store", "--date", "--version", "--batch-size", "--device", "--no-heatmaps"],
    "evaluate": ["DATASET_DIR", "--backbone", "--json", "--figures", "--channels", "--device", "--roc"],
    "propose": ["IMAGES", "--candidate", "--defects-per-image", "--json", "--backbone", "--holdout-fraction"],
    "report": [
        "--store",
        "--product",
        "--since",
        "--until",
        "--min-score",
        "--anomalies",
        "--top",
        "--summary",
        "--format",
        "--output",
    ],
    "models": ["--product", "--store"],
    "serve": ["prefect server start"],
    "retrain": ["--product", "--normal", "--full"],
    "configure": ["--product", "--incoming", "--landing"],
    "nightly": ["--date"],
    "watch": ["--store"],
}
SLOW_TIMEOUT = 900


@dataclass
class Result:
    """A finished ``padim`` run."""

    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of a user's shell: quiet progress, a private Prefect home, no store set."""
    env = dict(os.environ)
    env.update(
        PADIM_PROGRESS="0",
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONWARNINGS="ignore",
    )
    for name in ("PADIM_STORE", "PADIM_DEBUG", "PADIM_VERBOSE", "PREFECT_API_URL"):
        env.pop(name, None)
    return env


def padim(env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120) -> Result:
    """Run ``python -m padim_cli.main ARGS`` and capture its output."""
    done = subprocess.run(
        [sys.executable, "-m", "padim_cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """Non-zero exit, exactly one ``error: ...`` line on stderr naming the fragments, no traceback."""
    assert result.code != 0, result.out
    assert "Traceback" not in result.out + result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# ---- help and the option contract ---------------------------------------------------------------


def test_help_lists_every_command(cli_env: dict[str, str]) -> None:
    result = padim(cli_env, "--help")
    assert result.code == 0
    listed = re.findall(r"^\s{2}(\w+)\s{2,}", result.out.split("Commands:")[1], flags=re.MULTILINE)
    assert set(COMMANDS) <= set(listed)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_contract_flags_and_examples(cli_env: dict[str, str], command: str) -> None:
    result = padim(cli_env, command, "--help")
    assert result.code == 0, result.err
    for flag in CONTRACT_FLAGS[command]:
        assert flag in result.out, f"padim {command} --help lacks {flag}"
    assert "Examples:" in result.out
    assert f"padim {command}" in result.out.split("Examples:")[1] or command == "serve"


def test_help_does_not_import_torch_or_prefect(cli_env: dict[str, str]) -> None:
    code = "import sys, padim_cli.main; print(sorted(m for m in ('torch', 'prefect') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, timeout=60)
    assert done.stdout.strip() == "[]"


# ---- user errors: one line, no traceback ------------------------------------------------------


def test_train_on_a_missing_folder(cli_env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    result = padim(cli_env, "train", "--product", "widget", "--normal", str(missing), "--store", str(tmp_path / "s"))
    assert_one_line_error(result, "normal images folder not found", str(missing))


def test_score_an_unknown_product(cli_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "night").mkdir()
    (tmp_path / "store").mkdir()
    images, store = str(tmp_path / "night"), str(tmp_path / "store")
    result = padim(cli_env, "score", "--product", "nosuchproduct", "--images", images, "--store", store)
    assert_one_line_error(result, "no model for product 'nosuchproduct'")


@pytest.mark.parametrize("command", ["train", "score", "models"])
def test_path_escaping_product_is_rejected(cli_env: dict[str, str], tmp_path: Path, command: str) -> None:
    extra = {"train": ["--normal", str(tmp_path)], "score": ["--images", str(tmp_path)], "models": []}[command]
    result = padim(cli_env, command, "--product", "../evil", *extra, "--store", str(tmp_path / "store"))
    assert_one_line_error(result, "invalid product name '../evil'")
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["train", "--product", "a", "--normal", ".", "--device", "gpu"], "--device"),
        (["report", "--format", "xml"], "--format"),
        (["score", "--product", "a", "--images", ".", "--date", "25/11/2026"], "--date"),
        (["train", "--product", "a", "--normal", ".", "--backbone", "vgg16"], "--backbone"),
        (["report", "--top", "0"], "--top"),
        (["train", "--product", "a", "--normal", ".", "--crop", "200", "--no-crop"], "--crop"),
        (["evaluate", ".", "--roc"], "--roc"),
    ],
)
def test_bad_option_values_are_refused(cli_env: dict[str, str], args: list[str], option: str) -> None:
    result = padim(cli_env, *args)
    assert result.code == 2
    assert "Traceback" not in result.err
    assert option in result.err


def test_invalid_model_options_are_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    args = ["--product", "a", "--normal", str(tmp_path), "--image-size", "64", "--crop", "128"]
    result = padim(cli_env, "train", *args)
    assert_one_line_error(result, "crop_size (128) cannot exceed image_size (64)")


def test_report_needs_an_existing_store_and_parquet_an_output(cli_env: dict[str, str], tmp_path: Path) -> None:
    assert_one_line_error(padim(cli_env, "report", "--store", str(tmp_path / "nowhere")), "no store at")
    result = padim(cli_env, "report", "--store", str(tmp_path), "--format", "parquet")
    assert result.code == 2
    assert "--output" in result.err


def test_models_of_an_unknown_product(cli_env: dict[str, str], tmp_path: Path) -> None:
    assert_one_line_error(padim(cli_env, "models", "--product", "ghost", "--store", str(tmp_path)), "ghost")


def test_serve_without_a_server_explains_what_to_start(cli_env: dict[str, str]) -> None:
    assert_one_line_error(padim(cli_env, "serve"), "prefect server start", "PREFECT_API_URL")


def test_demo_refuses_a_folder_it_did_not_make(cli_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert_one_line_error(padim(cli_env, "demo", "--workdir", str(tmp_path)), "not made by `padim demo`")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_configure_writes_and_shows_product_settings(cli_env: dict[str, str], tmp_path: Path) -> None:
    store = tmp_path / "store"
    incoming = "s3://factory/bottle/incoming/{date}"
    saved = padim(cli_env, "configure", "-p", "bottle", "--incoming", incoming, "--store", str(store))
    assert saved.code == 0, saved.err
    settings = json.loads((store / "bottle" / "product.json").read_text())
    assert settings["incoming_url"] == incoming
    assert settings["landing_url"] is None
    padim(cli_env, "configure", "-p", "bottle", "--landing", str(tmp_path / "new-good"), "--store", str(store))
    shown = padim(cli_env, "configure", "-p", "bottle", "--store", str(store))
    assert shown.code == 0
    assert incoming in shown.out  # the first setting is kept
    assert str(tmp_path / "new-good") in shown.out


def test_debug_flag_shows_the_traceback(cli_env: dict[str, str], tmp_path: Path) -> None:
    for args in (["--debug", "train"], ["train", "--debug"]):
        result = padim(cli_env, *args, "--product", "../evil", "--normal", str(tmp_path))
        assert result.code != 0
        assert "Traceback" in result.err
        assert "InvalidProductNameError" in result.err


# ---- error descriptions (in-process) ------------------------------------------------------------


def test_describe_error_unwraps_and_flattens() -> None:
    from pydantic import BaseModel, Field, ValidationError

    from padim.errors import ModelNotFoundError

    class Settings(BaseModel):
        batch_size: int = Field(ge=1)

    with pytest.raises(ValidationError) as caught:
        Settings(batch_size=0)
    assert describe_error(caught.value) == "invalid settings: batch_size: Input should be greater than or equal to 1"
    assert exit_code_for(caught.value) == 1

    class PrefectWrapperError(Exception):
        pass

    PrefectWrapperError.__module__ = "prefect.exceptions"
    wrapper = PrefectWrapperError("flow run failed")
    wrapper.__cause__ = ModelNotFoundError("no model for product 'x'")
    assert describe_error(wrapper) == "no model for product 'x'"
    assert describe_error(FileNotFoundError(2, "No such file or directory", "/data/x.png")) == (
        "No such file or directory: /data/x.png"
    )
    assert describe_error(ValueError("line one\n  line two")) == "line one line two"
    bug = describe_error(ZeroDivisionError("division by zero"))
    assert bug.startswith("unexpected ZeroDivisionError: division by zero")
    assert exit_code_for(ZeroDivisionError()) == 2


# ---- end to end: the demo ---------------------------------------------------------------------


@dataclass
class Demo:
    """A finished ``padim demo`` run."""

    result: Result
    workdir: Path
    store: Path
    version: str


@pytest.fixture(scope="module")
def demo_run(cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """Run ``padim demo`` once (CPU), from outside the repository, and share its store with the queries below."""
    workdir = tmp_path_factory.mktemp("demo") / "work"
    outside = workdir.parent  # the installed command needs no checkout in its working directory
    result = padim(cli_env, "demo", "--workdir", str(workdir), "--device", "cpu", cwd=outside, timeout=SLOW_TIMEOUT)
    assert result.code == 0, result.err
    version = re.search(r"version (v\S+?),", result.out)
    assert version, result.out
    yield Demo(result=result, workdir=workdir, store=workdir / "store", version=version.group(1))


def report_rows(env: dict[str, str], store: Path, *args: str) -> list[dict[str, object]]:
    """``padim report --format json`` parsed."""
    result = padim(env, "report", "--store", str(store), *args, "--format", "json")
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    assert isinstance(rows, list)
    return rows


def kind_of(row: dict[str, object]) -> str:
    """``good``, ``scratch``, ``spot`` or ``crack`` from the night image's file name."""
    return Path(str(row["image_uri"])).name.split("_")[0]


@pytest.mark.slow
def test_demo_reports_a_high_auroc_and_finds_every_defect(cli_env: dict[str, str], demo_run: Demo) -> None:
    printed = re.search(r"Image AUROC on the demo night: ([0-9.]+)", demo_run.result.out)
    assert printed and float(printed.group(1)) > 0.9
    assert "Top anomalies" in demo_run.result.out
    rows = report_rows(cli_env, demo_run.store)
    assert len(rows) == 24
    assert all(row["status"] == "ok" for row in rows)
    labels = [int(kind_of(row) != "good") for row in rows]
    assert sum(labels) == 15
    assert roc_auc_score(labels, [float(row["score"]) for row in rows]) > 0.9  # type: ignore[arg-type]
    flagged = {kind_of(row) for row in rows if row["is_anomaly"]}
    assert {"scratch", "spot", "crack"} <= flagged
    defects_flagged = sum(bool(row["is_anomaly"]) for row in rows if kind_of(row) != "good")
    assert defects_flagged >= 14  # the defects are among the anomalies
    for row in rows:
        if row["is_anomaly"]:
            assert Path(str(row["heatmap_uri"])).is_file()  # a heat map per anomalous image


@pytest.mark.slow
def test_report_json_keys_are_the_report_columns(cli_env: dict[str, str], demo_run: Demo) -> None:
    rows = report_rows(cli_env, demo_run.store, "--product", "metal-plate")
    assert rows
    assert all(list(row) == list(REPORT_COLUMNS) for row in rows)


@pytest.mark.slow
def test_report_queries_over_the_demo_store(cli_env: dict[str, str], demo_run: Demo) -> None:
    rows = report_rows(cli_env, demo_run.store)
    scores = sorted((float(r["score"]) for r in rows), reverse=True)  # type: ignore[arg-type]
    top = report_rows(cli_env, demo_run.store, "--top", "3")
    assert [float(r["score"]) for r in top] == scores[:3]  # type: ignore[arg-type]
    anomalies = report_rows(cli_env, demo_run.store, "--anomalies")
    assert len(anomalies) == sum(bool(r["is_anomaly"]) for r in rows)
    summary = report_rows(cli_env, demo_run.store, "--summary")
    assert len(summary) == 1
    assert summary[0]["images"] == 24
    assert summary[0]["anomalies"] == len(anomalies)
    table = padim(cli_env, "report", "--store", str(demo_run.store), "--top", "2")
    assert table.code == 0
    assert "(2 rows)" in table.out
    csv_file = demo_run.workdir / "all.csv"
    written = padim(cli_env, "report", "--store", str(demo_run.store), "--format", "csv", "--output", str(csv_file))
    assert written.code == 0
    assert len(csv_file.read_text().strip().splitlines()) == 25  # header + 24 rows


@pytest.mark.slow
def test_models_lists_the_demo_version(cli_env: dict[str, str], demo_run: Demo) -> None:
    result = padim(cli_env, "models", "--product", "metal-plate", "--store", str(demo_run.store))
    assert result.code == 0, result.err
    line = next(line for line in result.out.splitlines() if demo_run.version in line)
    assert line.startswith("*")  # the latest
    assert "efficientnet_lite0" in line
    listed = json.loads(
        padim(cli_env, "models", "-p", "metal-plate", "--store", str(demo_run.store), "--format", "json").out
    )
    assert [v["version"] for v in listed] == [demo_run.version]
    assert listed[0]["n_train"] == 60  # the held-out calibration images join the statistics


# ---- end to end: padim train and padim score ----------------------------------------------------


@pytest.mark.slow
def test_train_then_score_twice_through_the_cli(cli_env: dict[str, str], tmp_path: Path) -> None:
    data = make_demo_dataset(tmp_path / "data", n_train=12, n_night=6, size=96, seed=5)
    store = tmp_path / "store"
    small = ["--weights", "random", "--image-size", "64", "--channels", "16", "--device", "cpu"]
    trained = padim(
        cli_env, "train", "-p", "plate", "--normal", str(data.train_dir), "--store", str(store), *small,
        "--json", timeout=SLOW_TIMEOUT,
    )  # fmt: skip
    assert trained.code == 0, trained.err
    version = json.loads(trained.out)["version"]
    assert json.loads(trained.out)["n_train"] == 12  # the held-out calibration images join the statistics

    args = ["score", "-p", "plate", "--images", str(data.night_dir), "--store", str(store), "--date", "2026-11-25"]
    first = padim(cli_env, *args, timeout=SLOW_TIMEOUT)
    assert first.code == 0, first.err
    assert f"with model {version}" in first.out
    assert re.search(r"scored\s+6\b", first.out)
    assert re.search(r"errors\s+0\b", first.out)
    second = padim(cli_env, *args, "--json", timeout=SLOW_TIMEOUT)
    assert second.code == 0, second.err
    again = json.loads(second.out)
    assert (again["n_scored"], again["n_skipped"]) == (0, 6)  # idempotent re-run
    assert len(report_rows(cli_env, store, "--product", "plate")) == 6


def test_unreachable_storage_is_one_line_with_its_own_exit_code(cli_env: dict[str, str], tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **cli_env,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    (tmp_path / "night").mkdir()
    result = padim(env, "score", "-p", "bottle", "--images", str(tmp_path / "night"), "--store", "s3://bkt/store")
    assert result.code == 3, result.err
    assert_one_line_error(result, "storage unreachable", f"127.0.0.1:{port}")
    assert "unexpected" not in result.err
