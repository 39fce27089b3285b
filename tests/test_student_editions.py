"""The student editions in notebooks/exercises/, one per notebook, written by `sdjax strip-solutions notebooks
notebooks/exercises` and committed: each is up to date with its solution notebook, has the student edition's first
and last cells, keeps the outputs of every cell but the exercises and their checks, and runs in quick mode through
its unsolved exercises, whose checks report them open while sdjax's own version stands in for them."""

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from sdjax import editions
from sdjax import exercises as ex
from sdjax.cli import main

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
EDITIONS = ROOT / "notebooks" / "exercises"
CHECK = re.compile(r"\bcheck_(\w+)\(")
FALLBACK = re.compile(r'sdjax_version\("(\w+)"\)')


def test_one_student_edition_per_notebook():
    assert sorted(p.name for p in EDITIONS.glob("*.ipynb")) == [p.name for p in SOLUTIONS]


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_student_edition_is_up_to_date(path):
    committed = json.loads((EDITIONS / path.name).read_text())
    assert committed == editions.student_edition(path, EDITIONS / path.name).notebook, (
        f"notebooks/exercises/{path.name} is out of date: run `sdjax strip-solutions notebooks notebooks/exercises`"
    )


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_exercises_are_registered_and_fall_back(path):
    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    checked = CHECK.findall("\n".join(cells))
    assert checked, "every notebook of the path has an exercise"
    assert [(ex.EXERCISES[n].notebook, ex.EXERCISES[n].number) for n in checked] == [
        (path.name[:2], k + 1) for k in range(len(checked))
    ]
    for name in checked:  # where later cells call the learner's function, its check cell falls back to sdjax's
        at = next(i for i, source in enumerate(cells) if f"check_{name}(" in source)
        if any(re.search(rf"(?<![\w.]){name}\(", source) for source in cells[at + 1 :]):
            assert f'{name} = exercises.sdjax_version("{name}")' in cells[at], f"{path.name}: {name} has no fallback"


def toy_notebook(tmp_path):
    """notebooks/01_toy.ipynb: a markdown cell with a Colab link, an exercise with its check, and a plain cell
    with an output."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "[Colab](https://colab.research.google.com/github/me/repo/blob/main/notebooks/01_toy.ipynb)"
        ),
        nbformat.v4.new_code_cell(
            "def upsample_nearest(x):\n    # BEGIN SOLUTION\n    return x\n    # END SOLUTION\n\n\n"
            "exercises.check_upsample_nearest(upsample_nearest)"
        ),
        nbformat.v4.new_code_cell("print('figure')"),
    ]
    for i, cell in enumerate(nb.cells[1:], start=1):
        cell.execution_count = i
        cell.outputs = [nbformat.v4.new_output("stream", text=f"output {i}\n")]
    path = tmp_path / "notebooks" / "01_toy.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    return path


def test_student_edition_cells(tmp_path):
    src = toy_notebook(tmp_path)
    edition = editions.student_edition(src, tmp_path / "notebooks" / "exercises" / "01_toy.ipynb")
    nb = nbformat.reads(json.dumps(edition.notebook), as_version=4)
    nbformat.validate(nb)
    assert (edition.stripped, edition.cleared, [e.name for e in edition.exercises]) == (1, 1, ["upsample_nearest"])
    header, link, exercise, plain, summary_text, summary = nb.cells
    assert "Student edition" in header.source and "[`../01_toy.ipynb`](../01_toy.ipynb)" in header.source
    assert "2 · `upsample_nearest`" in header.source  # exercise 2 of notebook 01
    assert "blob/main/notebooks/01_toy.ipynb" in header.source  # the solutions on Colab
    assert "blob/main/notebooks/exercises/01_toy.ipynb" in link.source  # this notebook's own badge opens this copy
    assert ex.PLACEHOLDER in exercise.source and "return x" not in exercise.source
    assert exercise.outputs == [] and exercise.execution_count is None
    assert plain.outputs[0].text == "output 2\n" and plain.execution_count == 2
    assert summary.cell_type == "code" and 'sdjax.exercises.summary("01")' in summary.source
    # outside the solutions' folder the links are left alone
    elsewhere = editions.student_edition(src, tmp_path / "handout" / "01_toy.ipynb").notebook
    assert "blob/main/notebooks/01_toy.ipynb" in "".join(elsewhere["cells"][1]["source"])


def test_strip_solutions_command_writes_and_checks(tmp_path, capsys):
    src = toy_notebook(tmp_path)
    out = tmp_path / "notebooks" / "exercises"
    assert main(["strip-solutions", str(src.parent), str(out), "--check"]) == 1
    assert "OUT OF DATE" in capsys.readouterr().out
    assert main(["strip-solutions", str(src.parent), str(out)]) == 0
    assert "cells with solutions stripped: 1" in capsys.readouterr().out
    assert main(["strip-solutions", str(src.parent), str(out), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    nb = nbformat.read(src, as_version=4)
    nb.cells[2].source = "print('a new figure')"
    nbformat.write(nb, src)
    assert main(["strip-solutions", str(src.parent), str(out), "--check"]) == 1
    captured = capsys.readouterr()
    assert "OUT OF DATE" in captured.out and "run `sdjax strip-solutions" in captured.err


def test_committed_student_editions_pass_the_command_check():
    assert main(["strip-solutions", str(ROOT / "notebooks"), str(EDITIONS), "--check"]) == 0


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


# Executing a prefix costs 6–90 s on the 2-core CI machine (mostly XLA compiling the training steps before the last
# check), about 3 minutes for the seven: these run with the notebooks (-m notebooks), in CI's notebook step.
@pytest.mark.notebooks
@pytest.mark.parametrize("path", sorted(EDITIONS.glob("*.ipynb")), ids=lambda p: p.name)
def test_student_edition_runs_past_open_exercises(path, tmp_path, monkeypatch):
    """Quick mode, offline: every cell up to the last check cell, then the summary cell, with a cell after each
    fallback that asks whether sdjax's version took the learner's place. No error; every check reports its
    exercise open."""
    monkeypatch.setenv("SDJAX_QUICK", "1")
    monkeypatch.setenv("SDJAX_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    checks = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and CHECK.search(c.source)]
    names = [n for i in checks for n in CHECK.findall(nb.cells[i].source)]
    fallbacks = [n for i in checks for n in FALLBACK.findall(nb.cells[i].source)]
    cells, probes = [], []
    for cell in nb.cells[: checks[-1] + 1]:
        cells.append(cell)
        for name in FALLBACK.findall(cell.source) if cell.cell_type == "code" else []:
            probe = f'import sdjax.exercises\n\nprint("{name}", {name} is sdjax.exercises.sdjax_version("{name}"))'
            probes.append(nbformat.v4.new_code_cell(probe))
            cells.append(probes[-1])
    nb.cells = cells + [nb.cells[-1]]  # the student edition's last cell: the summary
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    said = "".join(stdout(c) for c in nb.cells if CHECK.search(c.source))
    for name in names:
        assert f"({name}) is still open: write the body of {name}" in said
    probed = "".join(stdout(c) for c in probes)
    assert probed.split() == [word for n in fallbacks for word in (n, "True")]
    summary = stdout(nb.cells[-1])
    assert f"Exercises, notebook {path.name[:2]}: 0 of {len(names)} correct." in summary
    assert all(f"○ exercise {k + 1} of notebook {path.name[:2]} ({n}): open" in summary for k, n in enumerate(names))
