"""The wheel carries every committed table, sidecar and schema, where the runtime looks for them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)]
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = out.glob("moetune-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_ships_every_committed_table_and_sidecar(wheel_files):
    committed = {f"moetune/tuned_configs/{p.name}" for p in (ROOT / "tuned_configs").glob("*.json")}
    assert committed <= wheel_files


def test_wheel_never_ships_a_cpu_interpreter_table(tmp_path):
    """Even one left in tuned_configs/ (git ignores it, and `moetune validate` flags it)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "notebooks"))
    (src / "tuned_configs" / "E=4,N=96,device_name=CPU_triton_interpreter.json").write_text("{}")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)]
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("moetune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moetune/tuned_configs/__init__.py" in names
    assert not [n for n in names if "CPU_triton_interpreter" in n]


def test_wheel_ships_the_schemas(wheel_files):
    assert {"moetune/schemas/config_table.schema.json", "moetune/schemas/sidecar.schema.json"} <= wheel_files


def test_installed_package_finds_its_tables_folder():
    from moetune.tables import packaged_tables_dir

    assert (packaged_tables_dir() / "__init__.py").exists()


def test_data_folders_are_found_from_a_source_checkout_that_is_not_installed(monkeypatch):
    """On the GPU machine moetune runs from PYTHONPATH: moetune.schemas does not exist as a module."""
    from moetune import tables

    def not_installed(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(tables.resources, "files", not_installed)
    assert tables.data_dir("schemas") == ROOT / "schemas"
    assert tables.packaged_tables_dir() == ROOT / "tuned_configs"
