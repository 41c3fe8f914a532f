"""Start-up: `import headstart`, `info`, `check` and `predict` with a frozen backbone import no torch, timm, torchvision, matplotlib, scikit-learn, SciPy.

Each command runs in a fresh interpreter (a module imported by an earlier test would hide the import), through the
console-script entry point, in process, so that `sys.modules` can be read when it returns. When a heavy module is
imported, the test names the line of headstart that imported it first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CATS_DOGS_TINY

MODEL = Path(__file__).parent / "fixtures" / "model_v2"  # efficientnet_lite0, frozen, with a linear head
PHOTO = CATS_DOGS_TINY / "val" / "cats" / "cat.4001.jpg"

# Runs `headstart ARGS...` (or only `import headstart` when there are no ARGS), then prints, on its last line,
# the exit code, the heavy modules imported, and for each the innermost headstart line that imported it.
PROBE = """
import importlib.util, json, os, sys, traceback

HEAVY = ("matplotlib", "scipy", "sklearn", "timm", "torch", "torchvision")
PACKAGE = os.path.dirname(importlib.util.find_spec("headstart").origin) + os.sep
first = {}


class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in HEAVY and name not in first:
            lines = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
            first[name] = lines[-1] if lines else "?"
        return None


sys.meta_path.insert(0, Spy())
code = 0
if len(sys.argv) > 1:
    from headstart.cli.main import run

    sys.argv[0] = "headstart"
    try:
        run()
    except SystemExit as e:
        code = e.code
else:
    import headstart
print()
print(json.dumps({"exit": code, "heavy": {m: first.get(m, "?") for m in sorted(HEAVY) if m in sys.modules}}))
"""


def probe(*args: str | Path, cache: Path) -> str:
    """Which heavy modules a fresh `headstart ARGS...` imported, each with the headstart line that imported it ("" if none)."""
    env = {**os.environ, "HEADSTART_CACHE_DIR": str(cache), "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)
    command = " ".join(["headstart", *map(str, args)]) if args else "import headstart"
    assert done.returncode == 0 and done.stdout.strip(), f"{command} failed:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exit"] in (0, None), f"{command} exited {result['exit']}:\n{done.stdout}{done.stderr[-3000:]}"
    heavy = ", ".join(f"{name} (first at {line})" for name, line in result["heavy"].items())
    return f"{command} imported {heavy}" if heavy else ""


def test_import_headstart_imports_no_heavy_module(tmp_path: Path) -> None:
    assert probe(cache=tmp_path) == ""


@pytest.mark.parametrize("args", [["info", MODEL], ["check", CATS_DOGS_TINY]], ids=["info", "check"])
def test_info_and_check_import_no_heavy_module(args: list[str | Path], tmp_path: Path) -> None:
    assert probe(*args, cache=tmp_path) == ""


def test_predict_with_a_frozen_backbone_exported_to_onnx_imports_no_heavy_module(tmp_path: Path) -> None:
    probe("predict", MODEL, PHOTO, cache=tmp_path)  # the first run exports the backbone to ONNX, which needs torch
    assert probe("predict", MODEL, PHOTO, cache=tmp_path) == ""


def test_public_names_stay_functions_once_every_module_is_imported() -> None:
    """A submodule named like a public function (`headstart.report`) would replace it on the package once imported."""
    code = (
        "import importlib, pkgutil, headstart\n"
        "for m in pkgutil.walk_packages(headstart.__path__, 'headstart.'):\n"
        "    if m.name != 'headstart.server': importlib.import_module(m.name)\n"
        "print(sorted(n for n in headstart._EXPORTS if getattr(headstart, n) is not getattr(importlib.import_module(headstart._EXPORTS[n]), n)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
