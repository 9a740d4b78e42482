"""Every module of the package imports on its own in a fresh interpreter (no import cycles), and
`import rewriter` loads neither torch nor ONNX Runtime."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
_NOT_IMPORTABLE = {"rewriter.__main__"}  # runs the CLI when imported


def _modules() -> list[str]:
    names = []
    for package in ("rewriter", "passes"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            if name not in _NOT_IMPORTABLE:
                names.append(name)
    return names


def _import_alone(name: str) -> str | None:
    result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
    return None if result.returncode == 0 else f"{name}: {result.stderr.strip().splitlines()[-1]}"


def test_every_module_imports_on_its_own():
    modules = _modules()
    assert len(modules) > 50
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [failure for failure in pool.map(_import_alone, modules) if failure]
    assert not failures, "\n".join(failures)


def test_import_rewriter_is_light():
    code = "import sys, rewriter; print(sorted({'torch', 'onnxruntime', 'onnx'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
