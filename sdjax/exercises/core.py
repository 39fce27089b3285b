"""The machinery of the exercise checks (:mod:`sdjax.exercises`): the registry, the verdicts, and the comparison of
a learner's function with sdjax's own that names the mistake; and the two schedules the checks use."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import numpy as np

from sdjax.schedulers import NoiseSchedule

_MARK = "# YOUR CODE HERE"
PLACEHOLDER = f"...  {_MARK}"  # what a solution becomes in the student edition


class ExerciseError(AssertionError):
    """The learner's answer is not right yet; the message says why."""


class _Open(Exception):
    """Raised inside a check when the learner's function is still the student edition's placeholder."""


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One exercise of the notebooks: where it is, and sdjax's own answer with the exercise's signature (what a
    notebook uses in place of the learner's function until that passes its check)."""

    notebook: str  # "01" … "07", the notebook's number
    number: int  # the exercise's number within its notebook
    name: str  # the function the learner writes; its check is ``check_<name>``
    sdjax_version: Callable

    def __str__(self) -> str:
        return f"exercise {self.number} of notebook {self.notebook} ({self.name})"


EXERCISES: dict[str, Exercise] = {}  # name → exercise, filled by the ``check_*`` of pixels.py and latent.py
verdicts: dict[str, str] = {}  # name → the latest check's verdict in this Python process: correct, open, wrong: …


def register(notebook: str, number: int, name: str, sdjax_version: Callable):
    """Register the decorated ``check_<name>`` as the check of an exercise, and let it report an open exercise
    (the placeholder still in place) by a printed line and False instead of an error."""

    def decorate(check_fn: Callable[[Callable], bool]) -> Callable[[Callable], bool]:
        exercise = EXERCISES[name] = Exercise(notebook, number, name, sdjax_version)

        @functools.wraps(check_fn)
        def checked(fn: Callable) -> bool:
            try:
                ok = check_fn(fn)
            except _Open:
                verdicts[name] = "open"
                print(
                    f"○ {exercise} is still open: write the body of {name} in place of `{PLACEHOLDER}` (and "
                    "`return` the result), run its cell, then this check again."
                )
                return False
            except ExerciseError as e:
                verdicts[name] = f"wrong: {e}"
                raise
            verdicts[name] = "correct"
            return ok

        return checked

    return decorate


def sdjax_version(name: str) -> Callable:
    """sdjax's own answer to exercise ``name``, with the exercise's signature: what a notebook uses in place of
    the learner's function while that does not pass its check, so that the cells after it still run."""
    if name not in EXERCISES:
        in_order = sorted(EXERCISES.values(), key=lambda e: (e.notebook, e.number))
        raise KeyError(f"no exercise named {name!r}; the exercises are {', '.join(e.name for e in in_order)}")
    return EXERCISES[name].sdjax_version


def summary(notebook: str | None = None) -> None:
    """Print where the exercises stand in this Python process (the kernel, in a notebook): ✓ correct, ✗ wrong
    (with the check's message), ○ still open, or not checked yet. ``notebook`` ("01" … "07") lists every exercise
    of that notebook; without it, every exercise checked so far."""
    chosen = [e for e in EXERCISES.values() if (e.notebook == notebook if notebook else e.name in verdicts)]
    chosen.sort(key=lambda e: (e.notebook, e.number))
    if not chosen:
        print(f"notebook {notebook} has no exercises" if notebook else "no exercise has been checked yet")
        return
    correct = sum(verdicts.get(e.name) == "correct" for e in chosen)
    where = f"notebook {notebook}" if notebook else "checked so far"
    print(f"Exercises, {where}: {correct} of {len(chosen)} correct.")
    for e in chosen:
        verdict = verdicts.get(e.name, "not checked yet: run its check cell")
        mark = {"correct": "✓", "open": "○"}.get(verdict, "✗" if verdict.startswith("wrong") else "·")
        print(f"  {mark} {e}: {verdict}")


def is_open(fn: Callable) -> bool:
    """Whether ``fn`` still holds the student edition's placeholder line (read from its source; notebook cells
    have one). Only asked of a function that returned None."""
    try:
        return _MARK in inspect.getsource(fn)
    except (OSError, TypeError):  # no source to read: a builtin, or code compiled from a string
        return False


def run_answer(name: str, fn: Callable, args) -> np.ndarray:
    try:
        out = fn(*args)
    except Exception as e:  # the learner's code: any exception is a finding to explain, not to hide
        raise ExerciseError(f"{name}: your function raised {type(e).__name__}: {e}") from e
    if out is None:
        if is_open(fn):
            raise _Open
        raise ExerciseError(
            f"{name}: your function returned None — replace the `...` with your code and `return` the result."
        )
    return np.asarray(out, dtype=np.float64)


def check(
    name: str, fn: Callable, reference: Callable, args, mistakes: list[tuple[Callable, str]], rtol=1e-5, atol=1e-6
) -> bool:
    got = run_answer(name, fn, args)
    want = np.asarray(reference(*args), dtype=np.float64)
    if got.shape == want.shape and np.allclose(got, want, rtol=rtol, atol=atol):
        print(f"✓ {name}: correct.")
        return True
    for wrong, why in mistakes:
        w = np.asarray(wrong(*args), dtype=np.float64)
        if w.shape == got.shape and np.allclose(got, w, rtol=rtol, atol=atol):
            raise ExerciseError(f"{name}: {why}")
    if got.shape != want.shape:
        raise ExerciseError(f"{name}: the output has shape {got.shape}, expected {want.shape}.")
    err = np.max(np.abs(got - want))
    raise ExerciseError(
        f"{name}: not the expected values (largest difference {err:.3g}). "
        f"First expected values: {want.ravel()[:4].round(4)}, yours: {got.ravel()[:4].round(4)}."
    )


def inputs(seed: int, *shapes):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes)]


# The checks' schedules: DDPM's linear β and an ε-prediction one, no clipping (the exercises use the equations as
# written).
LINEAR = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
EPSILON = NoiseSchedule(prediction_type="epsilon", clip_sample=False)
