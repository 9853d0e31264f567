"""Packaging: the kernels install as ``peft_quant.kernels`` and import from a wheel, an sdist and an editable install;
from the checkout's root, the top-level ``kernels/`` folder never stands in for Hugging Face's ``kernels`` package.

The builds run on a copy of the sources (nothing is written into the checkout) with the environment's setuptools
(the dev extra pins it), without build isolation, so they need no network. Each install goes into a throwaway
virtualenv that sees this environment's packages through a ``.pth`` file, so only peft-quant itself is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a build reads: pyproject.toml's metadata files and the folders its [tool.setuptools] packages map from.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "peft_quant", "kernels", "model_cards")
KERNEL_MODULES = sorted(path.stem for path in (ROOT / "kernels").glob("*.py") if path.stem != "__init__")

# Run in an install's virtualenv, away from the checkout: locate peft_quant without running its __init__ (that imports
# torch, peft and transformers, ~10 s; the full import runs in test_checkout_root_*), then import peft_quant.kernels
# and locate each kernel module. Prints where each came from.
LOCATE_KERNELS = """
import importlib.util, json, sys
sys.modules["peft_quant"] = importlib.util.module_from_spec(importlib.util.find_spec("peft_quant"))
import peft_quant.kernels
origins = {name: importlib.util.find_spec(f"peft_quant.kernels.{name}").origin for name in sys.argv[1:]}
print(json.dumps({"__init__": peft_quant.kernels.__file__, "use_triton": callable(peft_quant.kernels.use_triton),
                  **origins}))
"""


def _run(args: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **env))
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _venv(folder: Path) -> Path:
    """A virtualenv whose Python also sees this environment's site-packages (appended after its own, and without
    their .pth files, so this environment's own peft-quant install stays invisible); returns its Python."""
    _run([sys.executable, "-m", "venv", "--without-pip", folder], cwd=folder.parent)
    python = folder / "bin" / "python"
    own = _run([python, "-c", "import site; print(site.getsitepackages()[0])"], cwd=folder).stdout.strip()
    Path(own, "outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _pip_install(python: Path, *args) -> None:
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed", *args],
         cwd=python.parents[2])


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """A copy of the sources, the sdist built from it and the wheel built from that sdist (as ``python -m build``
    does, so a file the sdist forgets fails the build)."""
    work = tmp_path_factory.mktemp("packaging")
    src, dist = work / "src", work / "dist"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    build_sdist = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
    sdist = _run([sys.executable, "-c", build_sdist], cwd=src).stdout.strip().splitlines()[-1]
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, dist / sdist],
         cwd=work)
    (wheel,) = dist.glob("peft_quant-*.whl")
    return {"src": src, "sdist": dist / sdist, "wheel": wheel, "work": work}


def test_wheel_and_sdist_carry_the_kernels_cards_and_license(builds):
    wheel = set(zipfile.ZipFile(builds["wheel"]).namelist())
    assert {f"peft_quant/kernels/{name}.py" for name in ["__init__", *KERNEL_MODULES]} <= wheel
    assert "peft_quant/model_cards/adapter.md" in wheel
    assert not any(name.startswith("kernels/") for name in wheel)  # never a top-level `kernels`
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel)
    metadata = next(name for name in wheel if name.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(builds["wheel"]).read(metadata).decode()

    with tarfile.open(builds["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml", "kernels/__init__.py", "model_cards/adapter.md"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["wheel", "sdist", "editable"])
def test_kernels_import_as_peft_quant_kernels(builds, mode, tmp_path):
    python = _venv(tmp_path / "venv")
    targets = {"wheel": [builds["wheel"]], "sdist": [builds["sdist"]], "editable": ["-e", builds["src"]]}
    _pip_install(python, *targets[mode])
    located = json.loads(_run([python, "-c", LOCATE_KERNELS, *KERNEL_MODULES], cwd=tmp_path).stdout.splitlines()[-1])
    assert located.pop("use_triton") is True
    expected = builds["src"] / "kernels" if mode == "editable" else python.parents[1] / "lib"
    for name, origin in located.items():
        assert Path(origin).is_relative_to(expected), (name, origin)
        if mode != "editable":
            assert Path(origin).parent.name == "kernels" and Path(origin).parent.parent.name == "peft_quant"


def _hugging_face_kernels() -> Path | None:
    """Where this environment's Hugging Face ``kernels`` package is, if it is installed (looked up without the
    checkout's root, whose ``kernels/`` folder would be found first)."""
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    return Path(spec.origin) if spec is not None and spec.origin else None


def _stand_in(folder: Path) -> Path:
    """A stand-in for Hugging Face's ``kernels``: a regular package, without metadata or ``__version__`` (so
    transformers' probe does not go on to import names from it)."""
    (folder / "kernels").mkdir(parents=True)
    (folder / "kernels" / "__init__.py").write_text('"""Stand-in for Hugging Face\'s kernels package."""\n')
    return folder / "kernels" / "__init__.py"


IMPORT_FROM_ROOT = """
import json, kernels, peft_quant, peft_quant.kernels
print(json.dumps({"kernels": kernels.__file__, "peft_quant.kernels": peft_quant.kernels.__file__}))
"""


@pytest.mark.slow
def test_checkout_root_imports_hugging_face_kernels_and_peft_quant(builds, tmp_path):
    """From the root of an editable checkout (``python -c`` puts it first on sys.path), ``import kernels`` is Hugging
    Face's package, not the folder, and ``import peft_quant`` works (transformers >= 5.24 imports ``kernels``). Where
    that package is not installed, a stand-in plays it (the real one's metadata would make transformers import names
    from the stand-in)."""
    env = {}
    if (expected := _hugging_face_kernels()) is None:
        expected = _stand_in(tmp_path / "stand_in")
        env["PYTHONPATH"] = str(tmp_path / "stand_in")
    python = _venv(tmp_path / "venv")
    _pip_install(python, "-e", builds["src"])
    imported = json.loads(_run([python, "-c", IMPORT_FROM_ROOT], cwd=builds["src"], **env).stdout.splitlines()[-1])
    assert Path(imported["kernels"]) == expected
    assert Path(imported["peft_quant.kernels"]) == builds["src"] / "kernels" / "__init__.py"


def test_checkout_root_without_hugging_face_kernels_has_no_kernels_package(tmp_path):
    """Without Hugging Face's package (``-S``: no site-packages), ``import kernels`` from the root is an empty namespace
    package, which transformers' probe reads as not installed, and bitsandbytes' ``get_kernel`` probe fails cleanly."""
    probe = ("import kernels\nassert getattr(kernels, '__file__', None) is None and list(kernels.__path__) == []\n"
             "try:\n    from kernels import get_kernel\nexcept ImportError:\n    print('absent')\n")
    assert _run([sys.executable, "-S", "-c", probe], cwd=ROOT).stdout.strip() == "absent"
    expected = _stand_in(tmp_path)
    probe = "import kernels\nprint(kernels.__file__)"
    found = _run([sys.executable, "-S", "-c", probe], cwd=ROOT, PYTHONPATH=str(tmp_path)).stdout.strip()
    assert Path(found) == expected
