"""The architecture's layers and packaging, as ``docs/architecture.md`` draws them.

* ``lint-imports`` (import-linter, contracts in ``pyproject.toml``) passes on the sources, and fails
  on a copy of them with one deliberate upward import per contract - so the contracts can fail;
* every package folder is installed, and the orchestration folders only under ``padim_prefect``:
  outside the repository ``import flows`` fails while ``padim_prefect.flows`` imports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
ORCHESTRATION = {"flows", "tasks", "deployments"}


def lint_imports(cwd: Path, config: Path | None = None, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` (no cache, so an edited copy is analysed afresh)."""
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extras (pip install -e '.[dev]')")
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    command = [str(LINT_IMPORTS), "--no-cache"]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    assert len(contracts) == 4 and f"Contracts: {len(contracts)} kept, 0 broken" in done.stdout


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the library and the orchestration, importable as the installed names."""
    copy = tmp_path_factory.mktemp("layers")
    shutil.copytree(ROOT / "padim", copy / "padim")
    shutil.copytree(ROOT / "padim_cli", copy / "padim_cli")
    for folder in sorted(ORCHESTRATION):
        shutil.copytree(ROOT / folder, copy / "padim_prefect" / folder)
    return copy


UPWARD = {
    "core imports jobs": ("padim/core/config.py", "import padim.jobs.engine", "padim is layered"),
    "io imports jobs": ("padim/io/store.py", "import padim.jobs.training", "padim is layered"),
    "core imports io": ("padim/core/model.py", "import padim.io.loading", "padim is layered"),
    "padim imports prefect": ("padim/io/fsio.py", "import prefect", "the library imports no orchestration"),
    "padim imports the CLI": ("padim/jobs/engine.py", "import padim_cli.main", "the library imports no orchestration"),
    "tasks import flows": ("padim_prefect/tasks/storage.py", "import padim_prefect.flows.score", "tasks never import"),
    "flows import the CLI": ("padim_prefect/flows/score.py", "import padim_cli.runner", "flows never import"),
}


@pytest.mark.parametrize("case", sorted(UPWARD))
def test_a_deliberate_upward_import_breaks_its_contract(source_copy: Path, case: str, tmp_path: Path) -> None:
    module, statement, contract = UPWARD[case]
    work = tmp_path / "src"
    shutil.copytree(source_copy, work)
    target = work / module
    target.write_text(target.read_text() + f"\n{statement}  # deliberate upward import\n")
    config = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", config)
    done = lint_imports(tmp_path, config=config, pythonpath=work)
    assert done.returncode != 0, f"{case}: lint-imports passed with {statement!r} in {module}\n{done.stdout}"
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith(contract) for line in broken), done.stdout
    unchanged = lint_imports(tmp_path, config=config, pythonpath=source_copy)
    assert unchanged.returncode == 0, unchanged.stdout  # the copy itself is clean: the statement broke it


def package_folders() -> set[str]:
    """Dotted names of every package folder, as installed (orchestration under ``padim_prefect``)."""
    names = set()
    for top in ("padim", "padim_cli", *sorted(ORCHESTRATION)):
        for init in (ROOT / top).rglob("__init__.py"):
            dotted = ".".join(init.parent.relative_to(ROOT).parts)
            names.add(f"padim_prefect.{dotted}" if top in ORCHESTRATION else dotted)
    return names


def test_every_package_folder_is_installed_and_the_orchestration_only_under_its_namespace() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert set(setuptools["packages"]) == package_folders()
    assert setuptools["package-dir"] == {f"padim_prefect.{name}": name for name in sorted(ORCHESTRATION)}
    assert not any(name.split(".")[0] in ORCHESTRATION for name in setuptools["packages"])


def test_no_generic_top_level_name_is_importable_outside_the_repository(tmp_path: Path) -> None:
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('padim_prefect.flows.nightly') is not None\n"
        "import padim_prefect.flows.nightly, padim_prefect.tasks.scoring, padim_prefect.deployments.serve\n"
        "found = [name for name in ('flows', 'tasks', 'deployments') if importlib.util.find_spec(name)]\n"
        "sys.exit(f'importable top-level names: {found}' if found else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def module_map() -> set[Path]:
    """The files and folders the module map of ``docs/architecture.md`` names."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Module map of `padim/`", 1)[1].split("\n## ", 1)[0]
    named = set()
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[1].startswith("`"):
            continue
        folder = ROOT / "padim" if cells[0] == "(top)" else ROOT / "padim" / cells[0].strip("`/")
        named |= {folder / name.strip("/") for name in cells[1].replace("`", "").split(", ")}
    return named


def test_the_module_map_in_the_docs_matches_the_tree() -> None:
    named = module_map()
    assert named, "docs/architecture.md has no module map"
    missing = sorted(str(path.relative_to(ROOT)) for path in named if not path.exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    modules = {
        path
        for path in (ROOT / "padim").rglob("*.py")
        if path.name != "__init__.py" and "backbones" not in path.relative_to(ROOT / "padim").parts
    }
    unnamed = sorted(str(path.relative_to(ROOT)) for path in modules - named)
    assert not unnamed, f"modules missing from the module map of docs/architecture.md: {unnamed}"
