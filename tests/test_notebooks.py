"""The committed notebooks: valid, executed in full (real outputs, no errors), exercises marked; and
the runner's clean-up of progress-bar output. CI executes them separately in quick mode."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def load_runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "tools" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_executed_and_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "commit the notebook with its outputs (a full run)"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0]
    sources = "".join(c.source for c in code)
    assert sources.count("# BEGIN SOLUTION") == sources.count("# END SOLUTION") >= 1
    assert "sdjax.notebook.setup()" in sources, "notebooks read quick/online mode through sdjax.notebook.setup()"


def test_notebooks_exist():
    assert [p.name[:2] for p in NOTEBOOKS][:2] == ["01", "02"]


def test_collapse_streams_keeps_what_the_reader_saw():
    runner = load_runner()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("text"), nbformat.v4.new_code_cell("x")]
    nb.cells[1].outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="train:  10%|#\r"),
        nbformat.v4.new_output("stream", name="stderr", text="train: 100%|##########|\n"),
        nbformat.v4.new_output("stream", name="stdout", text="done\n"),
    ]
    runner.collapse_streams(nb)
    nbformat.validate(nb)
    assert [o.text for o in nb.cells[1].outputs] == ["train: 100%|##########|\n", "done\n"]
    assert "outputs" not in nb.cells[0]
