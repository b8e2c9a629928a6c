"""A wheel built from the project carries every module and every search space (package data read
with importlib.resources), and runs outside a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents_and_a_non_editable_install_finds_the_spaces(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("tunebal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "tunebal").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    spaces = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
    shipped = sorted(Path(n).name for n in names if n.startswith("tunebal/search_spaces/"))
    assert spaces and shipped == spaces
    assert not any("/share/" in n for n in names)  # inside the package, not loose data files

    # a separate virtual environment, so the project's own (editable) install is never touched
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=300, capture_output=True)
    site = next(env.glob("lib/python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]  # torch, yaml, ... from this environment
    code = (
        "import tunebal, sys; from tunebal.tune.spaces import load_space, space_path;"
        "from tunebal.methods import METHODS, get_method_class; get_method_class('baseline');"
        "assert tunebal.__file__.startswith(sys.argv[1]), tunebal.__file__;"
        "[load_space(m, 'synth', 8) for m in sorted(METHODS)];"
        "print(space_path('aim'))"
    )
    out = subprocess.run([str(python), "-c", code, str(site)], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(deps)},
                         check=True, timeout=120, capture_output=True, text=True)
    assert out.stdout.strip() == str(site / "tunebal" / "search_spaces" / "aim.yaml")
