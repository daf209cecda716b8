"""Packaging: the top-level folders install as `geovr.*` both from a wheel and as an editable install."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = {
    "app": "geovr.app",
    "eval": "geovr.eval",
    "pipeline": "geovr.pipeline",
    "student": "geovr.student",
    "teachers": "geovr.teachers",
    "corpus": "geovr.corpus",
    "teacher_cache": "geovr.teacher_cache",
    "configs": "geovr.configs",
}
PRESETS = {"tiny", "vggt-1b", "qwen3vl-2b-geovr"}


def run_python(code: str, cwd: Path, *flags: str) -> str:
    result = subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def source_files(folder: str) -> set[str]:
    """Files a wheel must ship for a top-level folder: its Python modules (and the presets)."""
    root = REPO / folder
    patterns = ("*.py", "*.yaml") if folder == "configs" else ("*.py",)
    return {
        str(path.relative_to(root))
        for pattern in patterns
        for path in root.rglob(pattern)
        if "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (so the build leaves nothing in the work tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in PACKAGES:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-cache-dir",
        "-q",
    ]
    result = subprocess.run(
        [*command, "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    (path,) = (tmp / "dist").glob("geovr_pipeline-*.whl")
    return path


def test_wheel_ships_every_module_the_presets_and_the_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "geovr-pipeline = geovr.app.cli:main" in archive.read(entry_points).decode()
    for folder, package in PACKAGES.items():
        prefix = package.replace(".", "/") + "/"
        shipped = {n[len(prefix) :] for n in names if n.startswith(prefix)}
        missing = source_files(folder) - shipped
        assert not missing, (
            f"{folder}/ files missing from the wheel (list the subpackage in pyproject.toml): {sorted(missing)}"
        )


def test_non_editable_install_imports_from_the_install(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-cache-dir",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # -S: no site processing, so the editable install's path hook is not active; the dependencies
    # come from the venv's site-packages, appended after the installed wheel.
    code = f"""
import importlib, json, sys
sys.path.insert(0, {str(target)!r})
sys.path.append({sysconfig.get_paths()["purelib"]!r})
files = {{name: importlib.import_module(name).__file__ for name in {list(PACKAGES.values())!r}}}
from geovr.app.presets import load_section, preset_names
from geovr.corpus.config import SynthConfig
print(json.dumps({{"files": files, "presets": preset_names(), "frames": load_section(SynthConfig, "synth", "tiny").frames}}))
"""
    report = json.loads(run_python(code, tmp_path, "-S"))
    for name, file in report["files"].items():
        assert Path(file).is_relative_to(target / "geovr"), f"{name} imported from {file}"
    assert set(report["presets"]) >= PRESETS
    assert report["frames"] > 0


def test_editable_install_imports_from_the_repository(tmp_path: Path) -> None:
    code = f"import importlib, json; print(json.dumps({{n: importlib.import_module(n).__file__ for n in {list(PACKAGES.values())!r}}}))"
    files = json.loads(run_python(code, tmp_path))
    for folder, package in PACKAGES.items():
        assert Path(files[package]) == REPO / folder / "__init__.py"
    presets = run_python(
        "from geovr.app.presets import preset_names; print(' '.join(preset_names()))", tmp_path
    )
    assert set(presets.split()) >= PRESETS
