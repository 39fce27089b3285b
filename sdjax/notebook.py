"""The first cell of every notebook: where am I running, and how much work should I do?

    import sdjax.notebook
    env = sdjax.notebook.setup()
    steps = env.pick(quick=20, full=1500)

* quick mode (``SDJAX_QUICK=1``, set by ``tools/run_notebooks.py --quick`` in CI) shrinks data and
  training so every notebook executes in a minute or two;
* online (the Hugging Face Hub reachable, and ``SDJAX_OFFLINE`` unset) notebooks may switch from the
  offline datasets (``shapes``, ``digits``) to real ones through ``datasets``.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class NotebookEnv:
    quick: bool
    online: bool
    backend: str
    devices: int

    def pick(self, *, quick, full):
        """``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full


def setup(dpi: int = 90) -> NotebookEnv:
    """Read the mode from the environment, set plotting defaults, print a one-line summary."""
    import jax
    import matplotlib.pyplot as plt

    from sdjax.data import hub_reachable

    quick = os.environ.get("SDJAX_QUICK", "0") == "1"
    online = hub_reachable()
    env = NotebookEnv(quick=quick, online=online, backend=jax.default_backend(), devices=jax.device_count())
    plt.rcParams.update({"figure.dpi": dpi, "axes.spines.top": False, "axes.spines.right": False})
    print(
        f"JAX {jax.__version__} on {env.backend} ({env.devices} device{'s' * (env.devices > 1)}) · "
        f"quick mode {'ON: small data, few steps' if quick else 'off'} · "
        f"Hugging Face Hub {'reachable' if online else 'unreachable: offline datasets only'}"
    )
    return env
