"""The package's layout: the module list of sdjax/__init__.py is complete and true, importing one
module loads only what it needs, no module is over 600 lines, and no module imports another's private
names (the structure issue 20 set)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import sdjax

PACKAGE = Path(sdjax.__file__).parent
MAX_LINES = 600


def top_level_modules() -> set[str]:
    files = {f"sdjax.{p.stem}" for p in PACKAGE.glob("*.py") if not p.name.startswith("_")}
    packages = {f"sdjax.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    return files | packages


def test_the_module_list_names_every_module_and_only_those():
    listed = set(re.findall(r"^ {4}(sdjax\.\w+)", sdjax.__doc__, re.M))
    assert listed == top_level_modules(), listed ^ top_level_modules()


def test_importing_the_blocks_does_not_load_the_pipeline():
    code = "import sys, sdjax.nn; print(' '.join(sorted(m for m in sys.modules if m.startswith('sdjax'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["sdjax", "sdjax.attention", "sdjax.nn"]


def test_no_module_is_longer_than_600_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(lengths.values()) <= MAX_LINES, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]


def test_no_module_imports_private_names_of_another():
    private = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdjax"):
                private += [
                    f"{path.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not private
