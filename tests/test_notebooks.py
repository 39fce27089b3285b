"""The committed notebooks: valid, executed in full (real outputs, no errors), exercises marked; the
runner's clean-up of progress-bar output; the dtype the notebooks' first cell picks for the machine. CI
executes the notebooks separately in quick mode."""

import hashlib
import importlib.util
import re
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import nbformat
import pytest

import sdjax.notebook
from sdjax.notebook import NotebookEnv

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
    assert not stray_outputs(nb)


# what a cell shows when it ends with a plotting call, a comparison or a function that returns a figure
STRAY = re.compile(r"<(Axes|Figure|matplotlib)|^(Text|Line2D|VBox|SelectionSlider|interactive)\(|^(True|False)$")


def stray_outputs(nb) -> list[str]:
    """What a reader should not see in a committed notebook: the repr of a matplotlib object or a bare
    bool as a cell's value (end the line with ";"), and a figure shown twice (a figure returned as the
    cell's value is drawn once by the inline backend and once as the value)."""
    found, seen = [], {}
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            text = "".join(data.get("text/plain", ""))
            shown_as_text = out.output_type == "execute_result" or "image/png" not in data  # else: a figure's alt text
            if out.output_type in ("execute_result", "display_data") and shown_as_text and STRAY.search(text.strip()):
                found.append(f"cell {i}: stray output {text.strip()[:60]!r}")
            if "image/png" in data:
                digest = hashlib.sha1(data["image/png"].encode()).hexdigest()
                if digest in seen:
                    found.append(f"cell {i}: the figure of cell {seen[digest]} again")
                seen.setdefault(digest, i)
    return found


def test_stray_outputs_are_found():
    nb = nbformat.v4.new_notebook()
    png = {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure size 640x480 with 1 Axes>"}
    nb.cells = [nbformat.v4.new_code_cell("fig"), nbformat.v4.new_code_cell("1 == 1"), nbformat.v4.new_code_cell("x")]
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data=png),
                           nbformat.v4.new_output("execute_result", data=png, execution_count=1)]  # fmt: skip
    nb.cells[1].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "True"}, execution_count=2)]
    nb.cells[2].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "3"}, execution_count=3)]
    assert stray_outputs(nb) == [
        "cell 0: stray output '<Figure size 640x480 with 1 Axes>'",
        "cell 0: the figure of cell 0 again",
        "cell 1: stray output 'True'",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_roadmap_table_lists_the_whole_path(path):
    """The table in each notebook's first cell: every notebook of the path, this one marked."""
    first = nbformat.read(path, as_version=4).cells[0].source
    rows = [m for line in first.splitlines() if (m := re.match(r"\| (\*\*→\*\*)? ?\| \**(\d\d) ", line))]
    listed = [m.group(2) for m in rows]
    on_disk = [p.name[:2] for p in NOTEBOOKS]
    assert listed[: len(on_disk)] == on_disk, f"{path.name}: the roadmap lists {listed}; the notebooks are {on_disk}"
    assert [m.group(2) for m in rows if m.group(1)] == [path.name[:2]], "exactly this notebook's row is marked"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_each_notebook_has_its_exercises_and_questions(path):
    """Every registered exercise of a notebook is written and checked in it (with the fallback to sdjax's version
    wherever later cells use it), and the notebook ends with questions whose answers are collapsed."""
    from sdjax import exercises

    nb = nbformat.read(path, as_version=4)
    code = "".join(c.source for c in nb.cells if c.cell_type == "code")
    mine = sorted((e.number, e.name) for e in exercises.EXERCISES.values() if e.notebook == path.name[:2])
    assert mine, f"{path.name} has no exercise"
    for _, name in mine:
        assert f"def {name}(" in code and f"exercises.check_{name}({name})" in code, f"{path.name}: exercise {name}"
    text = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    numbered = [int(n) for n in re.findall(r"\*\*Exercise (\d+)\.\*\*", text)]
    assert numbered == [n for n, _ in mine], f"{path.name}: exercises numbered {numbered} in the text"
    last = nb.cells[-1].source
    assert last.startswith("### Questions") and "<details>" in last and "</details>" in last


def test_slider_is_one_static_figure_without_widgets(monkeypatch, capsys):
    monkeypatch.setenv(sdjax.notebook.STATIC, "1")
    drawn = []
    assert sdjax.notebook.slider(drawn.append, [1, 2, 3], label="t") is None
    assert drawn == [2]
    assert "a slider over t appears here" in capsys.readouterr().out
    with pytest.raises(ValueError, match="value 5 is not one of"):
        sdjax.notebook.slider(drawn.append, [1, 2, 3], label="t", value=5)


def test_slider_redraws_on_change(monkeypatch):
    monkeypatch.setenv(sdjax.notebook.STATIC, "0")
    monkeypatch.setattr(plt, "show", lambda: None)
    drawn = []
    choice = sdjax.notebook.slider(drawn.append, [0.0, 0.5, 1.0], label="w", value=0.0)
    assert drawn == [0.0] and choice.options == (0.0, 0.5, 1.0)
    choice.value = 1.0
    assert drawn == [0.0, 1.0]


def test_unet_diagram_is_drawn_from_the_config():
    from sdjax import tiny_sd, viz
    from sdjax.models.unet import UNetConfig

    for config, levels, cross in ((tiny_sd.TINY_SD.unet, ["8×8×64", "4×4×128"], 5), (UNetConfig.sd15(), ["64×64×320",
                                  "32×32×640", "16×16×1280", "8×8×1280"], 7)):  # fmt: skip
        ax = viz.unet_diagram(config)
        texts = [t.get_text() for t in ax.texts]
        for level in levels:  # each level twice: the encoder's and the decoder's box
            assert sum(t.startswith(level + "\n") for t in texts) == 2, (level, texts)
        assert sum("Transformer2D" in t for t in texts) == cross  # every cross-attention level and the mid block
        assert any(f"77 × {config.cross_attention_dim}" in t for t in texts)
        plt.close(ax.figure)


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


@pytest.mark.parametrize(
    "backend,capability,dtype",
    [
        ("cpu", None, "float32"),
        ("tpu", None, "bfloat16"),
        ("gpu", "7.5", "float16"),  # Colab's T4: no bfloat16 on its tensor cores
        ("gpu", "7.0", "float16"),  # V100
        ("gpu", "8.0", "bfloat16"),  # A100
        ("gpu", "8.9", "bfloat16"),  # L4
        ("gpu", "10.0", "bfloat16"),  # B200: compared as numbers, not strings
        ("gpu", None, "float16"),
        ("gpu", "gfx90a", "float16"),  # not a CUDA capability: the half precision every GPU has
    ],
)
def test_notebook_dtype(backend, capability, dtype):
    env = NotebookEnv(quick=False, online=False, backend=backend, devices=1, compute_capability=capability)
    assert env.dtype == dtype


def test_setup_reads_the_gpu_and_says_which_dtype(monkeypatch, capsys):
    class T4:
        platform = "gpu"
        compute_capability = "7.5"

    monkeypatch.setattr(jax, "devices", lambda *args: [T4()])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda *args: 1)
    monkeypatch.setattr(plt, "rcParams", plt.rcParams.copy())  # setup() sets plotting defaults
    monkeypatch.setenv("SDJAX_OFFLINE", "1")
    monkeypatch.delenv("SDJAX_QUICK", raising=False)
    env = sdjax.notebook.setup()
    assert env == NotebookEnv(quick=False, online=False, backend="gpu", devices=1, compute_capability="7.5")
    assert env.dtype == "float16"
    assert "on gpu (1 device, compute capability 7.5; env.dtype float16)" in capsys.readouterr().out
