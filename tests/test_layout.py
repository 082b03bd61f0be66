"""The layering the code promises: algorithm and I/O libraries import neither Beam nor Prefect;
Beam stages import no Prefect. Each package is imported in a fresh interpreter, so one import
anywhere (even inside an ``__init__``) that drags a framework in fails here, naming the package."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ["pipeline.annotate", "pipeline.embed", "pipeline.index", "pipeline.select", "pipeline.curate",
             "pipeline.io", "pipeline.evaluate", "pipeline.report", "schemas"]
MODULES = ["pipeline.registry", "pipeline.spec", "pipeline.steps", "pipeline.components"]  # single-file libraries


def _modules(package: str) -> list[str]:
    path = ROOT / package.replace(".", "/")
    return [package] + [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(path)]) if not m.name.startswith("_")]


def _frameworks_after_import(modules: list[str]) -> set[str]:
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(' '.join(sorted({n.split('.')[0] for n in sys.modules} & {'apache_beam', 'prefect'})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("package", LIBRARIES)
def test_libraries_import_no_framework(package):
    assert _frameworks_after_import(_modules(package)) == set(), f"{package} pulls in a framework"


@pytest.mark.parametrize("module", MODULES)
def test_single_modules_import_no_framework(module):
    assert _frameworks_after_import([module]) == set(), f"{module} pulls in a framework"


def test_beam_stages_import_no_prefect():
    assert "prefect" not in _frameworks_after_import(_modules("pipeline.stages"))
