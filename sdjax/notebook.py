"""The first cell of every notebook: where am I running, and how much work should I do?

    import sdjax.notebook
    env = sdjax.notebook.setup()
    steps = env.pick(quick=20, full=1500)

* quick mode (``SDJAX_QUICK=1``, set by ``tools/run_notebooks.py --quick`` in CI) shrinks data and
  training so every notebook executes in a minute or two;
* online (the Hugging Face Hub reachable, and ``SDJAX_OFFLINE`` unset) notebooks may switch from the
  offline datasets (``shapes``, ``digits``) to real ones through ``datasets``;
* ``env.dtype`` is the floating-point type to compute in on this accelerator: float32 on a CPU, bfloat16 on a
  TPU or a GPU that has it, float16 on an older GPU such as Colab's T4.

:func:`slider` puts a slider over a figure where ipywidgets is installed (JupyterLab with the ``dev`` extra,
Colab), and draws the figure once, as a plain output, everywhere else.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class NotebookEnv:
    quick: bool
    online: bool
    backend: str  # jax.default_backend(): "cpu", "gpu" or "tpu"
    devices: int
    compute_capability: str | None = None  # a CUDA GPU's, e.g. "7.5" on a T4, "8.0" on an A100; else None

    def pick(self, *, quick, full):
        """``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full

    @property
    def dtype(self) -> str:
        """The floating-point type to compute in here (a name: "float32", "bfloat16" or "float16").

        * CPU: float32. Most CPUs have no fast half-precision arithmetic (XLA converts to float32 around each
          operation), so half precision would save memory but not time.
        * TPU, and GPUs of compute capability ≥ 8.0 (A100, L4, RTX 30xx, H100): bfloat16. It keeps float32's
          exponent range (no overflow, no loss scaling) in half the memory, and their matrix units compute in it.
        * Older GPUs (Colab's T4 is 7.5, the V100 7.0) and GPUs whose capability is unknown: float16, the half
          precision every GPU computes in at full speed; their tensor cores have no bfloat16. float16 overflows
          past 65,504: keep normalisations and losses in float32.
        """
        if self.backend == "tpu":
            return "bfloat16"
        if self.backend != "gpu":
            return "float32"
        version = re.match(r"(\d+)\.(\d+)", self.compute_capability or "")
        return "bfloat16" if version and (int(version[1]), int(version[2])) >= (8, 0) else "float16"


def setup(dpi: int = 90) -> NotebookEnv:
    """Read the mode from the environment, set plotting defaults, print a one-line summary."""
    import jax
    import matplotlib.pyplot as plt

    from sdjax.data import hub_reachable

    quick = os.environ.get("SDJAX_QUICK", "0") == "1"
    online = hub_reachable()
    device = jax.devices()[0]
    env = NotebookEnv(
        quick=quick,
        online=online,
        backend=jax.default_backend(),
        devices=jax.device_count(),
        compute_capability=getattr(device, "compute_capability", None) if device.platform == "gpu" else None,
    )
    plt.rcParams.update({"figure.dpi": dpi, "axes.spines.top": False, "axes.spines.right": False})
    capability = f", compute capability {env.compute_capability}" if env.compute_capability else ""
    print(
        f"JAX {jax.__version__} on {env.backend} ({env.devices} device{'s' * (env.devices > 1)}{capability}; "
        f"env.dtype {env.dtype}) · "
        f"quick mode {'ON: small data, few steps' if quick else 'off'} · "
        f"Hugging Face Hub {'reachable' if online else 'unreachable: offline datasets only'}"
    )
    return env


STATIC = "SDJAX_STATIC"  # set to 1 (tools/run_notebooks.py does) for plain outputs only: no widgets in saved notebooks


def slider(draw, values, *, label: str, value=None):
    """Draw ``draw(v)`` for one ``v`` of ``values``, with a slider to pick another where ipywidgets is installed.

    ``draw(v)`` makes one matplotlib figure (it should be quick: compute the images for every value first, and let
    ``draw`` only show them). ``value`` is the first one drawn (default: the middle of ``values``). Without
    ipywidgets, or with ``SDJAX_STATIC=1``, the figure is drawn once as a plain output and a line says how to get
    the slider. Returns the ipywidgets ``SelectionSlider``, or None when there is none.
    """
    import matplotlib.pyplot as plt
    from IPython.display import display

    values = list(values)
    value = values[len(values) // 2] if value is None else value
    if value not in values:
        raise ValueError(f"slider: value {value!r} is not one of {values}")
    try:
        if os.environ.get(STATIC, "0") == "1":
            raise ImportError
        import ipywidgets
    except ImportError:
        draw(value)
        plt.show()
        print(f"(run in Jupyter with ipywidgets, and a slider over {label} appears here)")
        return None

    out = ipywidgets.Output()
    choice = ipywidgets.SelectionSlider(options=values, value=value, description=label, continuous_update=False)

    def show(v):
        with out:
            out.clear_output(wait=True)
            draw(v)
            plt.show()

    choice.observe(lambda change: show(change["new"]), names="value")
    display(ipywidgets.VBox([choice, out]))
    show(value)
    return choice
