"""What a user installs: one namespace, `vitrank`, that lives beside any other distribution.

The repository keeps its top-level folders (`search/`, `spaces/`, ...); the build maps them
into `vitrank.search`, `vitrank.spaces`, ... . These tests build the real wheel and install
it next to a distribution that owns a top-level `spaces` package, as Hugging Face's does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "vitrank", "core", "workloads", "spaces",
           "evaluators", "search", "reports")  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vitrank's wheel, built from a copy of the sources (the checkout stays untouched)."""
    pytest.importorskip("setuptools")
    tree = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=ignore)
        else:
            shutil.copy2(source, tree / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(out), str(tree)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (found,) = out.glob("vitrank-*.whl")
    return found


def test_every_file_of_the_wheel_installs_under_vitrank(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith(("vitrank/", "vitrank-"))]
    assert not outside, f"files outside the vitrank namespace: {outside[:10]}"
    dist_info = {n.split("/")[0] for n in names if n.startswith("vitrank-")}
    assert len(dist_info) == 1 and dist_info.pop().endswith(".dist-info")
    for package in ("core", "workloads", "spaces", "evaluators", "search", "reports", "cli"):
        assert f"vitrank/{package}/__init__.py" in names, package
    assert "vitrank/workloads/assets/digits_vit/model.safetensors" in names
    assert "vitrank/core/operators/__init__.py" in names
    assert all(f"vitrank/{p}/py.typed" in names for p in ("core", "search", "spaces"))


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _wheel_owning_spaces(folder: Path) -> Path:
    """A minimal distribution, `other-spaces`, whose package is a top-level `spaces`."""
    files = {
        "spaces/__init__.py": b"OWNER = 'other-spaces'\n",
        "spaces/zero.py": b"GPU = 'zero'\n",
        "other_spaces-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: other-spaces\nVersion: 1.0\n"
        ),
        "other_spaces-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: vitrank-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
        "other_spaces-1.0.dist-info/top_level.txt": b"spaces\n",
    }
    record = [_record_line(n, d) for n, d in files.items()]
    record.append("other_spaces-1.0.dist-info/RECORD,,")
    path = folder / "other_spaces-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("other_spaces-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_vitrank_installs_and_uninstalls_beside_a_top_level_spaces(
    wheel: Path, tmp_path: Path
) -> None:
    other = _wheel_owning_spaces(tmp_path)
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    # away from the checkout, whose folders would otherwise be importable from the cwd
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    def pip(*args: str) -> None:
        subprocess.run(
            [str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
            check=True, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=clean_env,
        )  # fmt: skip

    def imports() -> str:
        probe = (
            "import importlib.util, spaces, spaces.zero;"
            "print(spaces.OWNER, spaces.zero.GPU,"
            " importlib.util.find_spec('vitrank') is not None)"
        )
        result = subprocess.run(
            [str(python), "-c", probe],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=clean_env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    pip("install", "--no-index", "--no-deps", str(other))
    pip("install", "--no-index", "--no-deps", str(wheel))
    assert imports() == ["other-spaces", "zero", "True"]
    site = next((env / "lib").glob("python*/site-packages"))
    assert sorted(p.name for p in (site / "spaces").glob("*.py")) == ["__init__.py", "zero.py"]
    assert (site / "vitrank" / "spaces" / "__init__.py").is_file()

    pip("uninstall", "-y", "vitrank")
    assert imports() == ["other-spaces", "zero", "False"]
    assert not (site / "vitrank").exists()
