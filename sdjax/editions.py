"""Student editions of the notebooks: the solutions taken out, the reference figures kept.

The notebooks are committed with their solutions between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` lines
(so CI proves they run). :func:`student_edition` makes the learner's copy: each solution becomes
:data:`sdjax.exercises.PLACEHOLDER`, the exercise and check cells lose their outputs, a first cell says how
to check answers and a last one lists the exercises still open (:func:`sdjax.exercises.summary`).
``sdjax strip-solutions notebooks notebooks/exercises`` writes them all.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from sdjax.exercises import EXERCISES, PLACEHOLDER, Exercise

_SOLUTION = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION.*?^[ \t]*# END SOLUTION[^\n]*\n?", re.M | re.S)
_CHECK_CALL = re.compile(r"\bcheck_(\w+)\(")
_COLAB_LINK = "https://colab.research.google.com/github/"


def strip_source(source: str) -> str:
    """Replace every ``# BEGIN SOLUTION`` … ``# END SOLUTION`` region with a placeholder line."""

    def placeholder(m: re.Match) -> str:
        return f"{m.group('indent')}{PLACEHOLDER}\n"

    if source.count("# BEGIN SOLUTION") != source.count("# END SOLUTION"):
        raise ValueError("unbalanced solution markers: every '# BEGIN SOLUTION' needs an '# END SOLUTION'")
    return _SOLUTION.sub(placeholder, source)


def _strip_cells(cells: list[dict]) -> tuple[int, int, list[Exercise]]:
    """Strip the solutions out of a notebook's cells, in place, and clear the outputs of its exercise and check
    cells (those with a solution region or a ``check_*`` call); every other cell keeps its outputs. Returns the
    number of cells stripped, the number cleared, and the exercises whose checks the notebook calls, in order."""
    stripped, cleared, checked = 0, 0, {}
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        new = strip_source(source)
        calls = _CHECK_CALL.findall(source)
        checked.update((name, EXERCISES[name]) for name in calls if name in EXERCISES)
        if new != source:
            stripped += 1
            cell["source"] = new.splitlines(keepends=True)
        if new != source or calls:
            cleared += 1
            cell["outputs"], cell["execution_count"] = [], None
            cell.get("metadata", {}).pop("execution", None)  # the timing of the run whose outputs are gone
    return stripped, cleared, list(checked.values())


def write_notebook(nb: dict, path: str | Path) -> None:
    """Write notebook JSON as Jupyter does (nbformat's layout: indent 1, sorted keys), creating folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def strip_notebook(src: str | Path, dst: str | Path) -> int:
    """Write notebook ``src`` to ``dst`` with its solutions stripped and the outputs of its exercise and check cells
    cleared, cell for cell (:func:`student_edition` adds the student edition's first and last cells).

    Returns the number of cells whose solutions were stripped.
    """
    nb = json.loads(Path(src).read_text(encoding="utf-8"))
    stripped, _, _ = _strip_cells(nb["cells"])
    write_notebook(nb, dst)
    return stripped


class StudentEdition(NamedTuple):
    """What :func:`student_edition` makes of a notebook."""

    notebook: dict  # the notebook's JSON, as :func:`write_notebook` writes it
    exercises: list[Exercise]  # the exercises it checks, in order
    stripped: int  # cells whose solutions became the placeholder
    cleared: int  # exercise and check cells whose outputs were cleared


def _cell(cell_type: str, source: str, cell_id: str, with_id: bool) -> dict:
    cell = {"cell_type": cell_type, "metadata": {}, "source": source.splitlines(keepends=True)}
    if cell_type == "code":
        cell.update(execution_count=None, outputs=[])
    if with_id:  # cell ids exist from nbformat 4.5 on
        cell["id"] = cell_id
    return cell


def _retarget_colab(cells: list[dict], src: Path, dst: Path) -> str | None:
    """Make the Open-in-Colab links to ``src`` in markdown cells open ``dst`` instead, when ``dst`` lies under
    ``src``'s folder (the links name repository paths). Returns the link to ``src``, or None if there is none."""
    pattern = re.compile(rf"{re.escape(_COLAB_LINK)}[^\s)]*/{re.escape(src.name)}")
    markdown = [c for c in cells if c["cell_type"] == "markdown"]
    found = [m.group() for c in markdown for m in pattern.finditer("".join(c["source"]))]
    if not found:
        return None
    folder = src.resolve().parent
    if dst.resolve().is_relative_to(folder):
        retargeted = found[0][: -len(src.name)] + dst.resolve().relative_to(folder).as_posix()
        for c in markdown:
            c["source"] = "".join(c["source"]).replace(found[0], retargeted).splitlines(keepends=True)
    return found[0]


def student_edition(src: str | Path, dst: str | Path) -> StudentEdition:
    """The learner's copy of notebook ``src``, as it is to be written at ``dst`` (its links are relative to ``dst``).

    Solutions become ``...  # YOUR CODE HERE`` and the exercise and check cells lose their outputs; every other
    cell keeps the outputs of the committed full run, so the learner sees the figures the text talks about. A first
    cell says that this is the student edition, where the solutions are and how to check an answer; a last one
    prints which exercises are still open (:func:`summary`). When ``dst`` lies under ``src``'s folder (the
    repository's ``notebooks/exercises/``), the notebook's Open-in-Colab links open the student edition.
    """
    src, dst = Path(src), Path(dst)
    nb = json.loads(src.read_text(encoding="utf-8"))
    stripped, cleared, exercises = _strip_cells(nb["cells"])
    with_id = nb.get("nbformat_minor", 0) >= 5
    solutions = Path(os.path.relpath(src.resolve(), dst.resolve().parent)).as_posix()
    colab = _retarget_colab(nb["cells"], src, dst)
    on_colab = f" ([open it in Colab]({colab}))" if colab else ""
    listing = ", ".join(f"{e.number} · `{e.name}`" for e in exercises) or "none"
    header = (
        f"> **Student edition.** This is the learner's copy of `{src.name}`: each exercise has `{PLACEHOLDER}`\n"
        f"> where its solution was. The solutions are in the notebook of the same name in "
        f"`{src.resolve().parent.name}/`,\n> [`{solutions}`]({solutions}){on_colab}. Try first!\n>\n"
        f"> **Exercises:** {listing}.\n>\n"
        "> **Checking your answers.** Write the function's body, run its cell, then run the check cell after it. ✓\n"
        "> means correct; a wrong answer stops with a message that names the likely mistake; ○ means the exercise is\n"
        "> still open. An open exercise does not stop *Run All*: where later cells use your function they use sdjax's\n"
        "> own version until yours passes, and the last cell lists the exercises still open.\n>\n"
        "> The other cells keep the outputs of the full run committed with the solutions, so you can compare your\n"
        "> figures with them; the exercise and check cells start empty."
    )
    first = [_cell("markdown", header, "student-edition", with_id)]
    last = []
    if exercises:
        last = [
            _cell("markdown", "## Your exercises\n\nWhich exercises of this notebook pass, and which are still open:",
                  "student-edition-summary-text", with_id),
            _cell("code", f'import sdjax.exercises\n\nsdjax.exercises.summary("{exercises[0].notebook}")',
                  "student-edition-summary", with_id),
        ]  # fmt: skip
    nb["cells"] = first + nb["cells"] + last
    return StudentEdition(nb, exercises, stripped, cleared)
