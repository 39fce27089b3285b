"""Exercise checks for the notebooks.

In a notebook, an exercise is a function the learner writes, between marker lines:

    def reparameterize(mean, logvar, eps):
        # BEGIN SOLUTION
        return mean + jnp.exp(0.5 * logvar) * eps
        # END SOLUTION

    sdjax.exercises.check_reparameterize(reparameterize)

The committed notebooks hold the solutions (so CI proves they run); ``sdjax strip-solutions`` writes
the learner's copy, the *student edition* (:func:`sdjax.editions.student_edition`), where each marked region becomes
``...  # YOUR CODE HERE``. Each ``check_*`` compares the learner's function with sdjax's own on random
inputs and, when they differ, tests the answer against the usual mistakes so the message says what is
wrong, not just that it is: it raises :class:`ExerciseError`.

An exercise not attempted yet is not an error. Called on the untouched placeholder, a check prints
"○ exercise N of notebook NN (name) is still open: …" and returns False, so *Run All* goes on; where the
notebook uses the learner's function later, its check cell falls back to sdjax's own version:

    if not sdjax.exercises.check_q_sample(q_sample):
        q_sample = sdjax.exercises.sdjax_version("q_sample")

:func:`summary` lists which exercises of a notebook are correct, wrong or still open.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdjax.chain import classifier_free_guidance
from sdjax.models.autoencoder import reconstruction_loss
from sdjax.models.vae import kl_divergence, reparameterize, vae_loss
from sdjax.nn import ResnetBlock, upsample_nearest
from sdjax.samplers import euler_step
from sdjax.schedulers import NoiseSchedule, ddpm_step, q_sample, training_target

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


EXERCISES: dict[str, Exercise] = {}  # name → exercise, filled by the ``check_*`` definitions below
_verdicts: dict[str, str] = {}  # name → the latest check's verdict in this Python process: correct, open, wrong: …


def _exercise(notebook: str, number: int, name: str, sdjax_version: Callable):
    """Register the decorated ``check_<name>`` as the check of an exercise, and let it report an open exercise
    (the placeholder still in place) by a printed line and False instead of an error."""

    def register(check: Callable[[Callable], bool]) -> Callable[[Callable], bool]:
        exercise = EXERCISES[name] = Exercise(notebook, number, name, sdjax_version)

        @functools.wraps(check)
        def run(fn: Callable) -> bool:
            try:
                ok = check(fn)
            except _Open:
                _verdicts[name] = "open"
                print(
                    f"○ {exercise} is still open: write the body of {name} in place of `{PLACEHOLDER}` (and "
                    "`return` the result), run its cell, then this check again."
                )
                return False
            except ExerciseError as e:
                _verdicts[name] = f"wrong: {e}"
                raise
            _verdicts[name] = "correct"
            return ok

        return run

    return register


def sdjax_version(name: str) -> Callable:
    """sdjax's own answer to exercise ``name``, with the exercise's signature: what a notebook uses in place of
    the learner's function while that does not pass its check, so that the cells after it still run."""
    if name not in EXERCISES:
        raise KeyError(f"no exercise named {name!r}; the exercises are {', '.join(EXERCISES)}")
    return EXERCISES[name].sdjax_version


def summary(notebook: str | None = None) -> None:
    """Print where the exercises stand in this Python process (the kernel, in a notebook): ✓ correct, ✗ wrong
    (with the check's message), ○ still open, or not checked yet. ``notebook`` ("01" … "07") lists every exercise
    of that notebook; without it, every exercise checked so far."""
    chosen = [e for e in EXERCISES.values() if (e.notebook == notebook if notebook else e.name in _verdicts)]
    chosen.sort(key=lambda e: (e.notebook, e.number))
    if not chosen:
        print(f"notebook {notebook} has no exercises" if notebook else "no exercise has been checked yet")
        return
    correct = sum(_verdicts.get(e.name) == "correct" for e in chosen)
    where = f"notebook {notebook}" if notebook else "checked so far"
    print(f"Exercises, {where}: {correct} of {len(chosen)} correct.")
    for e in chosen:
        verdict = _verdicts.get(e.name, "not checked yet: run its check cell")
        mark = {"correct": "✓", "open": "○"}.get(verdict, "✗" if verdict.startswith("wrong") else "·")
        print(f"  {mark} {e}: {verdict}")


def _is_open(fn: Callable) -> bool:
    """Whether ``fn`` still holds the student edition's placeholder line (read from its source; notebook cells
    have one). Only asked of a function that returned None."""
    try:
        return _MARK in inspect.getsource(fn)
    except (OSError, TypeError):  # no source to read: a builtin, or code compiled from a string
        return False


def _run(name: str, fn: Callable, args) -> np.ndarray:
    try:
        out = fn(*args)
    except Exception as e:  # the learner's code: any exception is a finding to explain, not to hide
        raise ExerciseError(f"{name}: your function raised {type(e).__name__}: {e}") from e
    if out is None:
        if _is_open(fn):
            raise _Open
        raise ExerciseError(
            f"{name}: your function returned None — replace the `...` with your code and `return` the result."
        )
    return np.asarray(out, dtype=np.float64)


def _check(
    name: str, fn: Callable, reference: Callable, args, mistakes: list[tuple[Callable, str]], rtol=1e-5, atol=1e-6
) -> bool:
    got = _run(name, fn, args)
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


def _inputs(seed: int, *shapes):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes)]


# --- notebook 01 ------------------------------------------------------------------------------------


def _resnet_block(block, x):
    """sdjax's answer to exercise 1 of notebook 01: :class:`sdjax.nn.ResnetBlock` itself, ``block(x)``."""
    return block(x)


def _post_activation(block, x):
    h = jax.nn.silu(block.norm2(block.conv2(jax.nn.silu(block.norm1(block.conv1(x))))))
    return (x if block.conv_shortcut is None else block.conv_shortcut(x)) + h


@_exercise("01", 1, "resnet_block", _resnet_block)
def check_resnet_block(fn: Callable) -> bool:
    """Exercise: wire a ResnetBlock's forward pass from its layers, ``fn(block, x)`` → y, with ``block`` an
    untrained :class:`sdjax.nn.ResnetBlock` (no time embedding) and x (B, H, W, C_in):

        h = conv1(SiLU(norm1(x))),    h = conv2(SiLU(norm2(h))),    y = shortcut(x) + h,

    shortcut = ``block.conv_shortcut`` (a 1×1 convolution) when C_in ≠ C_out, else the identity. Checked on a
    block that changes the channels (4 → 8) and on one that keeps them (8 → 8).
    """
    from flax import nnx

    (x,) = _inputs(11, (2, 6, 6, 4))
    widen = ResnetBlock(4, 8, groups=2, rngs=nnx.Rngs(1))
    keep = ResnetBlock(8, 8, groups=2, rngs=nnx.Rngs(2))
    for i, block in enumerate((widen, keep)):  # untrained GroupNorms are identities: make each one distinct
        params = nnx.state(block, nnx.Param)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(12 + i), len(leaves))
        noisy = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
        nnx.update(block, jax.tree.unflatten(tree, noisy))

    def shortcut(b, x):
        return x if b.conv_shortcut is None else b.conv_shortcut(x)

    mistakes = [
        (lambda b, x: b.conv2(jax.nn.silu(b.norm2(b.conv1(jax.nn.silu(b.norm1(x)))))), "the skip connection is "
         "missing: add shortcut(x) to the output of the second convolution."),
        (lambda b, x: shortcut(b, x) + b.conv2(b.norm2(b.conv1(b.norm1(x)))), "the SiLU nonlinearities are missing: "
         "without them the two convolutions collapse into one linear map."),
        (lambda b, x: shortcut(b, x) + b.conv2(jax.nn.relu(b.norm2(b.conv1(jax.nn.relu(b.norm1(x)))))), "that is "
         "ReLU; SD's blocks use SiLU(u) = u·σ(u) (jax.nn.silu), which is smooth at 0."),
        (lambda b, x: jax.nn.silu(shortcut(b, x) + b.conv2(jax.nn.silu(b.norm2(b.conv1(jax.nn.silu(b.norm1(x))))))),
         "no nonlinearity after the addition: in the pre-activation block the skip path stays an identity."),
        (lambda b, x: shortcut(b, x) + b.conv2(jax.nn.silu(b.norm1(b.conv1(jax.nn.silu(b.norm2(x)))))), "norm1 "
         "belongs before conv1 (it normalises C_in channels) and norm2 before conv2."),
    ]  # fmt: skip
    post = [(_post_activation, "that is the post-activation order (conv → norm → SiLU); this block is pre-activation: "
             "GroupNorm and SiLU come *before* each convolution.")]  # fmt: skip
    ok = _check("resnet_block", fn, _resnet_block, (keep, jnp.concatenate([x, x], axis=-1)), mistakes + post, atol=1e-5)
    try:  # (swapped norms or post-activation cannot run on a block that changes the channels)
        return ok & _check("resnet_block at 4 → 8 channels", fn, _resnet_block, (widen, x), mistakes[:4], atol=1e-5)
    except ExerciseError as e:
        if "raised" in str(e) and ("broadcast" in str(e) or "Incompatible shapes" in str(e)):
            raise ExerciseError(
                "resnet_block at 4 → 8 channels: x (4 channels) cannot be added to h (8 channels): when C_in ≠ C_out "
                "the skip path is block.conv_shortcut(x), a 1×1 convolution to C_out channels."
            ) from e
        raise


@_exercise("01", 2, "upsample_nearest", upsample_nearest)
def check_upsample_nearest(fn: Callable) -> bool:
    """Exercise: nearest-neighbour ×2 upsampling of an NHWC batch, (B, H, W, C) → (B, 2H, 2W, C)."""
    (x,) = _inputs(0, (2, 3, 5, 4))
    mistakes = [
        (
            lambda x: jnp.tile(x, (1, 2, 2, 1)),
            "jnp.tile copies the *whole image* side by side; nearest-neighbour repeats *each pixel* "
            "into a 2×2 block — use jnp.repeat along H and W.",
        ),
        (
            lambda x: jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1),
            "you repeated along axes 0 and 1 (batch and H). In NHWC, H and W are axes 1 and 2.",
        ),
        (
            lambda x: jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3),
            "you repeated along axes 2 and 3 (W and channels). In NHWC, H and W are axes 1 and 2.",
        ),
        (lambda x: jnp.repeat(x, 2, axis=1), "only H was doubled; repeat along W (axis 2) as well."),
        (lambda x: jnp.repeat(x, 2, axis=2), "only W was doubled; repeat along H (axis 1) as well."),
        (
            lambda x: jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), "bilinear"),
            "that is bilinear interpolation, which blends neighbours; nearest-neighbour copies each pixel.",
        ),
    ]
    return _check("upsample_nearest", fn, upsample_nearest, (x,), mistakes)


@_exercise("01", 3, "reconstruction_loss", reconstruction_loss)
def check_reconstruction_loss(fn: Callable) -> bool:
    """Exercise: the autoencoder's loss, the mean squared error over all pixels (a scalar)."""
    x, x_hat = _inputs(1, (4, 8, 8, 3), (4, 8, 8, 3))
    mistakes = [
        (
            lambda x, y: jnp.sum((x - y) ** 2),
            "you summed the squared errors; take the mean so the loss does not grow with image size and batch.",
        ),
        (
            lambda x, y: jnp.mean(jnp.abs(x - y)),
            "that is the mean *absolute* error (L1); the exercise asks for the mean *squared* error.",
        ),
        (lambda x, y: jnp.mean(x - y), "the errors were not squared, so positive and negative ones cancel out."),
        (lambda x, y: jnp.sqrt(jnp.mean((x - y) ** 2)), "that is the root of the MSE (RMSE); drop the square root."),
        (
            lambda x, y: jnp.mean((x - y) ** 2, axis=(1, 2, 3)),
            "you returned one loss per image; average over the batch too, to a single scalar.",
        ),
    ]
    return _check("reconstruction_loss", fn, reconstruction_loss, (x, x_hat), mistakes)


# --- notebook 02 ------------------------------------------------------------------------------------


@_exercise("02", 1, "reparameterize", reparameterize)
def check_reparameterize(fn: Callable) -> bool:
    """Exercise: z = μ + σ ⊙ ε with σ = exp(½ · logvar)."""
    mean, logvar, eps = _inputs(2, (3, 4, 4, 2), (3, 4, 4, 2), (3, 4, 4, 2))
    mistakes = [
        (
            lambda m, lv, e: m + jnp.exp(lv) * e,
            "you scaled ε by exp(logvar) = σ², the variance. Scale by the standard deviation σ = exp(½·logvar).",
        ),
        (lambda m, lv, e: m + lv * e, "logvar is log σ², not σ: the standard deviation is exp(½·logvar)."),
        (lambda m, lv, e: m + jnp.sqrt(jnp.abs(lv)) * e, "logvar is log σ², so σ = exp(½·logvar), not sqrt(logvar)."),
        (lambda m, lv, e: jnp.exp(0.5 * lv) * e, "the mean μ is missing: z = μ + σ·ε."),
        (lambda m, lv, e: m * jnp.exp(0.5 * lv) * e, "μ and σ·ε are added, not multiplied: z = μ + σ·ε."),
    ]
    ok = _check("reparameterize", fn, reparameterize, (mean, logvar, eps), mistakes)
    # The point of the trick: z is differentiable in μ and σ. dz/dμ summed = number of elements.
    grad = jax.grad(lambda m: jnp.sum(fn(m, logvar, eps)))(mean)
    if not np.allclose(grad, 1.0):
        raise ExerciseError("reparameterize: ∂z/∂μ should be 1 everywhere; is the gradient flowing through μ?")
    return ok


@_exercise("02", 2, "kl_divergence", kl_divergence)
def check_kl_divergence(fn: Callable) -> bool:
    """Exercise: KL(N(μ, σ²) ‖ N(0, 1)) summed over all but the batch axis, one value per example."""
    mean, logvar = _inputs(3, (3, 4, 4, 2), (3, 4, 4, 2))
    axes = (1, 2, 3)
    mistakes = [
        (
            lambda m, lv: jnp.sum(m**2 + jnp.exp(lv) - 1 - lv, axis=axes),
            "the factor ½ is missing: KL = ½ Σ (μ² + σ² − 1 − log σ²).",
        ),
        (
            lambda m, lv: 0.5 * jnp.mean(m**2 + jnp.exp(lv) - 1 - lv, axis=axes),
            "you averaged over the latent dimensions; the KL of independent dimensions is their *sum*.",
        ),
        (
            lambda m, lv: 0.5 * jnp.sum(m**2 + jnp.exp(lv) - 1 - lv),
            "you summed over the batch as well; return one KL per example, shape (B,).",
        ),
        (
            lambda m, lv: -0.5 * jnp.sum(m**2 + jnp.exp(lv) - 1 - lv, axis=axes),
            "the sign is flipped: a KL divergence is never negative.",
        ),
        (
            lambda m, lv: 0.5 * jnp.sum(m**2 + jnp.exp(0.5 * lv) - 1 - lv, axis=axes),
            "exp(½·logvar) is σ; the formula needs the variance σ² = exp(logvar).",
        ),
        (
            lambda m, lv: 0.5 * jnp.sum(m**2 + jnp.exp(lv) - 1 + lv, axis=axes),
            "the log-variance enters with a minus sign: ½ (μ² + σ² − 1 − log σ²).",
        ),
    ]
    return _check("kl_divergence", fn, kl_divergence, (mean, logvar), mistakes)


def _negative_elbo(model, x, key, beta):
    """sdjax's answer to exercise 3 of notebook 02: :func:`sdjax.models.vae_loss` with ``kl_weight = beta``, the loss
    value alone. x (B, H, W, 3) → ()."""
    return vae_loss(model, {"image": x}, key, kl_weight=beta)[0]


def _vae_parts(model, x, key):
    """(per-image summed squared error, per-image KL, per-pixel squared errors, moments) for the mistakes below."""
    q = model.encode(x)
    x_hat = model.decode(q.mean + jnp.exp(0.5 * q.logvar) * jax.random.normal(key, q.mean.shape))
    sq = (x - x_hat) ** 2
    return jnp.sum(sq, axis=(1, 2, 3)), kl_divergence(q.mean, q.logvar), sq, q


@_exercise("02", 3, "negative_elbo", _negative_elbo)
def check_negative_elbo(fn: Callable) -> bool:
    """Exercise: the VAE's training loss, the negative ELBO with a KL weight β, ``fn(model, x, key, beta)`` → a
    scalar. ``model`` is an :class:`sdjax.models.AutoencoderKL`: ``model.encode(x)`` gives q(z|x) with ``.mean``
    and ``.logvar`` (B, h, w, c), ``model.decode(z)`` gives x̂. With ε = ``jax.random.normal(key, mean.shape)``,

        z = μ + σ ε,   x̂ = D(z),   L = mean over the batch of [ Σ_pixels (x − x̂)²  +  β · KL(q(z|x) ‖ N(0, I)) ].

    Checked against :func:`sdjax.models.vae_loss` on a small untrained VAE.
    """
    from flax import nnx

    from sdjax.models.vae import AutoencoderKL, VAEConfig

    cfg = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=2, norm_num_groups=4)
    model = AutoencoderKL(cfg, rngs=nnx.Rngs(3))
    (x,) = _inputs(13, (3, 8, 8, 3))
    x, key, beta = jnp.tanh(x), jax.random.PRNGKey(5), 0.3

    def mode_loss(m, x, k, b):  # no sampling: z = μ
        q = m.encode(x)
        return jnp.mean(jnp.sum((x - m.decode(q.mean)) ** 2, axis=(1, 2, 3)) + b * kl_divergence(q.mean, q.logvar))

    def parts(m, x, k):
        return _vae_parts(m, x, k)

    mistakes = [
        (lambda m, x, k, b: jnp.mean(parts(m, x, k)[2]) + b * jnp.mean(parts(m, x, k)[1]), "the squared error is "
         "*summed* over the pixels of each image (−log p(x|z) of a Gaussian decoder), then averaged over the batch; "
         "a per-pixel mean shrinks it by H·W·3 against the KL."),
        (lambda m, x, k, b: jnp.mean(parts(m, x, k)[0] + parts(m, x, k)[1]), "the KL term is weighted by β: "
         "L = recon + β · KL."),
        (lambda m, x, k, b: jnp.mean(b * parts(m, x, k)[0] + parts(m, x, k)[1]), "β weights the KL term, not the "
         "reconstruction: L = recon + β · KL."),
        (lambda m, x, k, b: jnp.mean(parts(m, x, k)[0]), "the KL term is missing: without it the encoder is free to "
         "put the latents anywhere, and the prior N(0, I) is no use for sampling."),
        (mode_loss, "decode a *sample* z = μ + σ ε, not the mean μ: the ELBO is an expectation over q(z|x), and "
         "without the noise σ gets no gradient from the reconstruction."),
        (lambda m, x, k, b: jnp.sum(parts(m, x, k)[0] + b * parts(m, x, k)[1]), "average over the batch (one "
         "number per image, then the mean), so the loss does not grow with the batch size."),
    ]  # fmt: skip
    return _check("negative_elbo", fn, _negative_elbo, (model, x, key, beta), mistakes, rtol=1e-5, atol=1e-4)


# --- notebook 03 ------------------------------------------------------------------------------------

# The exercises' schedule: DDPM's linear β, no clipping (the exercises use the equations as written).
_DDPM = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)


def _q_sample(x0, t, noise, alphas_cumprod):
    """sdjax's answer to exercise 1 of notebook 03: :func:`sdjax.schedulers.q_sample` on the exercise's table of
    ᾱ_t rather than a :class:`NoiseSchedule`. x0, noise (B, H, W, C); t (B,) int; alphas_cumprod (T,)."""
    alpha_bar = jnp.asarray(alphas_cumprod)[t].reshape(-1, *(1,) * (x0.ndim - 1))
    return jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise


def _ddpm_step(x_t, eps_hat, t, betas, alphas_cumprod, z):
    """sdjax's answer to exercise 3 of notebook 03: :func:`sdjax.schedulers.ddpm_step` from t to t − 1 (posterior
    variance β̃_t, no clipping) on the exercise's tables of β_t and ᾱ_t. x_t, eps_hat, z (B, H, W, C); t an int."""
    beta, alpha_bar = betas[t], alphas_cumprod[t]
    alpha_bar_prev = alphas_cumprod[t - 1] if t > 0 else 1.0
    mean = (x_t - beta / jnp.sqrt(1.0 - alpha_bar) * eps_hat) / jnp.sqrt(1.0 - beta)
    return mean + jnp.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta) * z


@_exercise("03", 1, "q_sample", _q_sample)
def check_q_sample(fn: Callable) -> bool:
    """Exercise: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, with ``fn(x0, t, noise, alphas_cumprod)``.

    x0, noise (B, H, W, C); t (B,) int, one timestep per image; alphas_cumprod (T,) → (B, H, W, C).
    """
    x0, noise = _inputs(4, (5, 4, 4, 3), (5, 4, 4, 3))
    t = jnp.array([0, 10, 250, 600, 999])
    ab = jnp.asarray(_DDPM.alphas_cumprod)

    def per_image(c):
        return c[:, None, None, None]

    mistakes = [
        (
            lambda x, t, n, ab: per_image(ab[t]) * x + per_image(1 - ab[t]) * n,
            "the coefficients are square roots: x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, so that the variance of x_t stays 1.",
        ),
        (
            lambda x, t, n, ab: per_image(jnp.sqrt(ab[t])) * x + per_image(1 - ab[t]) * n,
            "the noise is scaled by √(1 − ᾱ_t), the standard deviation, not by the variance 1 − ᾱ_t.",
        ),
        (
            lambda x, t, n, ab: per_image(jnp.sqrt(1 - ab[t])) * x + per_image(jnp.sqrt(ab[t])) * n,
            "x_0 and ε are swapped: the signal keeps √ᾱ_t (near 1 at small t) and the noise gets √(1 − ᾱ_t).",
        ),
        (
            lambda x, t, n, ab: per_image(jnp.sqrt(ab[t - 1])) * x + per_image(jnp.sqrt(1 - ab[t - 1])) * n,
            "off by one: timesteps are 0-indexed here, so use alphas_cumprod[t], not [t − 1].",
        ),
        (
            lambda x, t, n, ab: per_image(jnp.sqrt(ab[t])) * x + per_image(jnp.sqrt(1 - ab[t])),
            "the noise ε is missing from the second term.",
        ),
    ]
    return _check("q_sample", fn, lambda x, t, n, ab: q_sample(_DDPM, x, t, n), (x0, t, noise, ab), mistakes)


_V = dataclasses.replace(_DDPM, prediction_type="v_prediction")


def _training_loss(model, x0, t, noise, alphas_cumprod):
    """sdjax's answer to exercise 2 of notebook 03: the body of :func:`sdjax.diffusion.diffusion_loss` for
    v-prediction, with t and ε given. ``alphas_cumprod`` is the table of ``_V``, the schedule the check uses."""
    del alphas_cumprod  # sdjax reads ᾱ_t from the schedule; the check passes that schedule's table
    x_t = q_sample(_V, x0, t, noise)
    return jnp.mean((model(x_t, t) - training_target(_V, x0, t, noise)) ** 2)


@_exercise("03", 2, "training_loss", _training_loss)
def check_training_loss(fn: Callable) -> bool:
    """Exercise: the training loss of this notebook's model, ``fn(model, x0, t, noise, alphas_cumprod)`` → a scalar:
    noise x_0 to level t, ask the network for v, and take the mean squared error,

        x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,    v = √ᾱ_t ε − √(1 − ᾱ_t) x_0,    L = mean (model(x_t, t) − v)²,

    x0, noise (B, H, W, C), t (B,) int, ``model(x, t)`` → (B, H, W, C). Checked against sdjax's
    :func:`~sdjax.schedulers.q_sample` and :func:`~sdjax.schedulers.training_target` with a stand-in network.
    """
    x0, noise = _inputs(14, (4, 5, 5, 3), (4, 5, 5, 3))
    x0 = jnp.tanh(x0)
    t = jnp.array([3, 250, 600, 990])
    ab = jnp.asarray(_V.alphas_cumprod)

    def model(x, t):  # a stand-in network: any fixed function of (x_t, t) will do
        return jnp.tanh(1.5 * x) * (0.2 + t / 1000)[:, None, None, None]

    def loss(target, x_t=None, t_model=None):
        a = ab[t][:, None, None, None]
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise if x_t is None else x_t
        return jnp.mean((model(xt, t if t_model is None else t_model) - target(a)) ** 2)

    v = lambda a: jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0  # noqa: E731
    mistakes = [
        (lambda m, x, t_, n, ab_: loss(lambda a: noise), "that is the ε-prediction target; this model predicts "
         "v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (section 2)."),
        (lambda m, x, t_, n, ab_: loss(lambda a: -v(a)), "the sign of v is flipped: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."),
        (lambda m, x, t_, n, ab_: loss(lambda a: x0), "that regresses x_0 directly; this model predicts v."),
        (lambda m, x, t_, n, ab_: loss(v, x_t=x0), "the network sees the *noisy* x_t, not the clean x_0 (which it "
         "never has at sampling time)."),
        (lambda m, x, t_, n, ab_: loss(v, t_model=t + 1), "timesteps are 0-indexed: call the network with t itself."),
        (lambda m, x, t_, n, ab_: loss(v) * x0.size, "take the mean over every element, not the sum: the loss should "
         "not grow with the image size and the batch."),
    ]  # fmt: skip
    return _check("training_loss", fn, _training_loss, (model, x0, t, noise, ab), mistakes)


@_exercise("03", 3, "ddpm_step", _ddpm_step)
def check_ddpm_step(fn: Callable) -> bool:
    """Exercise: one DDPM ancestral step (Algorithm 2), ``fn(x_t, eps_hat, t, betas, alphas_cumprod, z)``:

        x_{t−1} = 1/√α_t · (x_t − β_t/√(1 − ᾱ_t) · ε̂) + σ_t z,   σ_t² = β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t,

    with ᾱ_{−1} = 1, so that σ_0 = 0: the last step adds no noise. x_t, eps_hat, z (B, H, W, C); t a Python int; betas,
    alphas_cumprod (T,) → x_{t−1} (B, H, W, C). Checked at t = 500, 1 and 0.
    """
    x_t, eps, z = _inputs(5, (2, 4, 4, 3), (2, 4, 4, 3), (2, 4, 4, 3))
    betas, ab = jnp.asarray(_DDPM.betas), jnp.asarray(_DDPM.alphas_cumprod)

    def mean(x, e, t, b, ab):
        return (x - b[t] / jnp.sqrt(1 - ab[t]) * e) / jnp.sqrt(1 - b[t])

    def ab_prev(ab, t):
        return ab[t - 1] if t > 0 else 1.0

    def posterior_std(t, b, ab):
        return jnp.sqrt((1 - ab_prev(ab, t)) / (1 - ab[t]) * b[t])

    mistakes = [
        (
            lambda x, e, t, b, ab, z: mean(x, e, t, b, ab) + (t > 0) * jnp.sqrt(b[t]) * z,
            'σ_t² = β_t is DDPM\'s other choice ("fixed_large"); this exercise asks for the posterior '
            "variance β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t.",
        ),
        (
            lambda x, e, t, b, ab, z: (
                (x - b[t] / jnp.sqrt(1 - ab[t]) * e) / jnp.sqrt(ab[t]) + (t > 0) * posterior_std(t, b, ab) * z
            ),
            "divide by √α_t = √(1 − β_t) of this one step, not by √ᾱ_t of the whole chain.",
        ),
        (
            lambda x, e, t, b, ab, z: (
                (x - b[t] / (1 - ab[t]) * e) / jnp.sqrt(1 - b[t]) + (t > 0) * posterior_std(t, b, ab) * z
            ),
            "ε̂ is scaled by β_t / √(1 − ᾱ_t): the square root is missing.",
        ),
        (
            lambda x, e, t, b, ab, z: mean(x, e, t, b, ab) + (t > 0) * posterior_std(t, b, ab) ** 2 * z,
            "z is scaled by the standard deviation σ_t, not by the variance σ_t².",
        ),
    ]

    def reference(x, e, t, b, ab, z):
        return ddpm_step(_DDPM, e, t, t - 1, x, z).x_prev

    # sdjax (like diffusers) forms β_t as 1 − ᾱ_t/ᾱ_{t−1}, which in float32 keeps only ~4 digits at
    # t = 1 (β_1 ≈ 1.2e-4); the exercise's β_t comes straight from betas. Hence atol 1e-5: every
    # mistake above is off by more than 1e-3.
    ok = True
    for t in (500, 1, 0):
        ok &= _check(f"ddpm_step at t={t}", fn, reference, (x_t, eps, t, betas, ab, z), mistakes, rtol=1e-4, atol=1e-5)
    return ok


# --- notebook 06 ------------------------------------------------------------------------------------

_EPSILON = NoiseSchedule(prediction_type="epsilon", clip_sample=False)


def _euler_step(x, x0_hat, sigma, sigma_next):
    """sdjax's answer to the exercise of notebook 06: :func:`sdjax.samplers.euler_step`, given ε̂ = (x − x̂_0)/σ
    under an ε-prediction schedule, so that its denoiser D is x0_hat. x, x0_hat (B, H, W, C); σ, σ_next floats."""
    return euler_step(_EPSILON, (x - x0_hat) / sigma, x, jnp.float32(sigma), jnp.float32(sigma_next))


@_exercise("06", 1, "euler_step", _euler_step)
def check_euler_step(fn: Callable) -> bool:
    """Exercise: one Euler step of the probability-flow ODE dx/dσ = (x − D(x; σ))/σ from σ to σ_next,
    ``fn(x, x0_hat, sigma, sigma_next)``:

        d = (x − x̂_0)/σ,    x_next = x + (σ_next − σ) d,

    x = x_0 + σ ε (the σ parametrisation), x0_hat = D(x; σ) the denoiser's estimate of x_0. x, x0_hat
    (B, H, W, C); sigma, sigma_next Python floats, σ > σ_next ≥ 0 → x_next (B, H, W, C). Compared with
    :func:`sdjax.samplers.euler_step` (given ε̂ = (x − x̂_0)/σ under an ε-prediction schedule, so that its
    D is x0_hat) for a large step and for the last step, to σ = 0.
    """
    x0_hat, eps = _inputs(6, (2, 4, 4, 3), (2, 4, 4, 3))
    mistakes = [
        (
            lambda x, d0, s, s_next: x + (s - s_next) * (x - d0) / s,
            "the step goes the wrong way: σ decreases, so x_next = x + (σ_next − σ)·d with σ_next − σ < 0 and "
            "d = (x − x̂_0)/σ — the step moves x towards x̂_0.",
        ),
        (
            lambda x, d0, s, s_next: x + (s_next - s) * (x - d0),
            "the slope dx/dσ is (x − x̂_0)/σ: divide by σ.",
        ),
        (
            lambda x, d0, s, s_next: x + (s_next - s) * (x - d0) / s**2,
            "you divided by σ²: (x̂_0 − x)/σ² is the score ∇ log p; the ODE's slope is (x − x̂_0)/σ, σ times "
            "minus the score.",
        ),
        (
            lambda x, d0, s, s_next: x + (s_next - s) * (x - d0) / s_next,
            "explicit Euler evaluates the slope where you are, at σ, not at σ_next.",
        ),
        (
            lambda x, d0, s, s_next: d0 + s_next * (x - d0),
            "x − x̂_0 is σ·ε̂; re-noising to σ_next needs the noise itself, ε̂ = (x − x̂_0)/σ: x_next = x̂_0 + σ_next·ε̂.",
        ),
    ]
    ok = True
    for s, s_next in ((14.6, 3.1), (0.8, 0.0)):
        x = x0_hat + s * eps
        ok &= _check(
            f"euler_step at σ={s} → {s_next}", fn, _euler_step, (x, x0_hat, s, s_next), mistakes, rtol=1e-5, atol=1e-5
        )
    return ok


def _heun_step(denoise, x, sigma, sigma_next):
    """sdjax's answer to exercise 2 of notebook 06: :func:`sdjax.samplers.heun_step`'s predictor and corrector
    (EDM Algorithm 1), given the denoiser D(x; σ) as a function. x (B, H, W, C); sigma, sigma_next floats."""
    from sdjax.samplers.sigma import heun_step

    def out(x, s):  # the ε-prediction whose D is ``denoise``: ε̂ = (x − D(x; σ)) / σ
        return (x - denoise(x, s)) / s

    state = {"d": jnp.zeros_like(x), "x": x}
    x_pred, state = heun_step(_EPSILON, out(x, sigma), x, state, sigma, sigma, sigma_next, False)
    if sigma_next == 0:
        return x_pred
    return heun_step(_EPSILON, out(x_pred, sigma_next), x_pred, state, sigma, sigma_next, sigma_next, True)[0]


@_exercise("06", 2, "heun_step", _heun_step)
def check_heun_step(fn: Callable) -> bool:
    """Exercise: one step of Heun's method on the probability-flow ODE, ``fn(denoise, x, sigma, sigma_next)``,
    ``denoise(x, σ)`` the denoiser D(x; σ):

        d = (x − D(x; σ)) / σ,   x̃ = x + (σ_next − σ) d                        (Euler: the predictor)
        d' = (x̃ − D(x̃; σ_next)) / σ_next,   x_next = x + (σ_next − σ) (d + d') / 2   (the corrector)

    and the Euler step alone when σ_next = 0 (d' would divide by 0). Checked against
    :func:`sdjax.samplers.heun_step` with a stand-in denoiser, for σ = 2.5 → 1.2 and for a last step 0.4 → 0.
    """
    (x,) = _inputs(17, (2, 4, 4, 3))
    x = 2.5 * x

    def denoise(x, s):  # a stand-in denoiser: shrinks towards a σ-dependent target
        return jnp.tanh(x / (1 + s)) * (1 - 0.1 * s)

    def slope(x, s):
        return (x - denoise(x, s)) / s

    def euler(d, x, s, s1):
        return x + (s1 - s) * slope(x, s)

    def heun(d, x, s, s1, second=lambda x_e, s, s1: slope(x_e, s1), mix=lambda d1, d2: (d1 + d2) / 2):
        if s1 == 0:
            return euler(d, x, s, s1)
        return x + (s1 - s) * mix(slope(x, s), second(euler(d, x, s, s1), s, s1))

    mistakes = [
        (euler, "that is Euler's step alone: evaluate the slope again at the predicted x̃ and σ_next, and step from x "
         "with the average (d + d') / 2."),
        (lambda d, x, s, s1: heun(d, x, s, s1, second=lambda x_e, s, s1: slope(x_e, s)), "the corrector's slope d' is "
         "evaluated at the *new* noise level: D(x̃; σ_next), not D(x̃; σ)."),
        (lambda d, x, s, s1: heun(d, x, s, s1, mix=lambda d1, d2: d2), "average the two slopes, (d + d') / 2: the "
         "second one alone is a backward-Euler guess, first order again."),
        (lambda d, x, s, s1: euler(d, x, s, s1) + (s1 - s) * (slope(x, s) + slope(euler(d, x, s, s1), s1)) / 2
         if s1 else euler(d, x, s, s1), "the corrector starts from x, not from the predicted x̃: x_next = x + (σ_next "
         "− σ)(d + d')/2."),
    ]  # fmt: skip
    ok = _check("heun_step at σ = 2.5 → 1.2", fn, _heun_step, (denoise, x, 2.5, 1.2), mistakes, atol=1e-5)
    got = _run("heun_step", fn, (denoise, x, 0.4, 0.0))
    if not np.all(np.isfinite(got)):
        raise ExerciseError("heun_step at σ_next = 0: the result is not finite. The last step is Euler's alone: "
                            "d' = (x̃ − D(x̃; 0)) / 0 divides by zero.")  # fmt: skip
    return ok & _check("heun_step at σ = 0.4 → 0", fn, _heun_step, (denoise, x, 0.4, 0.0), mistakes, atol=1e-5)


# --- notebook 04 ------------------------------------------------------------------------------------


def _matching_cross_entropy(logits):
    """CE(ℓ, diag) = mean_i (log Σ_j exp ℓ_ij − ℓ_ii): row i's right answer is column i. (B, B) → ()."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(len(logits))).mean()


def _clip_loss(u, w, scale):
    """sdjax's answer to exercise 1 of notebook 04: :func:`sdjax.tiny_sd.clip_loss`'s formula on the embeddings,
    u, w (B, E) → ()."""
    return 0.5 * (_matching_cross_entropy(scale * u @ w.T) + _matching_cross_entropy(scale * w @ u.T))


@_exercise("04", 1, "clip_loss", _clip_loss)
def check_clip_loss(fn: Callable) -> bool:
    """Exercise: CLIP's symmetric contrastive loss, ``fn(u, w, scale)``: u (B, E) image and w (B, E) text
    embeddings, unit vectors, pair i matching; scale = exp(τ), a float. Logits ℓ = scale · u wᵀ (B, B), and

        L = ½ [ CE(ℓ, diag) + CE(ℓᵀ, diag) ],   CE(ℓ, diag) = mean_i (log Σ_j exp ℓ_ij − ℓ_ii)

    → a scalar. Compared with :func:`sdjax.tiny_sd.clip_loss`'s formula.
    """
    u, w = _inputs(7, (6, 8), (6, 8))
    u, w = u / jnp.linalg.norm(u, axis=1, keepdims=True), w / jnp.linalg.norm(w, axis=1, keepdims=True)
    ce = _matching_cross_entropy
    mistakes = [
        (lambda u, w, s: ce(s * u @ w.T), "that is one direction only (each image picks its caption); CLIP also "
         "asks each caption to pick its image: average CE(ℓ, diag) and CE(ℓᵀ, diag)."),
        (lambda u, w, s: 0.5 * (ce(u @ w.T) + ce(w @ u.T)), "multiply the cosine similarities by the scale "
         "exp(τ) before the softmax: without it the logits lie in [−1, 1] and the softmax can never be sharp."),
        (lambda u, w, s: ce(s * u @ w.T) + ce(s * w @ u.T), "the two cross-entropies are averaged (½ each), not "
         "summed."),
        (lambda u, w, s: -jnp.mean(jnp.diag(s * u @ w.T)), "maximising the matching pairs' similarity alone "
         "ignores the other captions in the batch: the loss is a cross-entropy over all B of them."),
    ]  # fmt: skip
    return _check("clip_loss", fn, _clip_loss, (u, w, 14.3), mistakes, rtol=1e-5, atol=1e-5)


def _cross_attention(x, context, wq, wk, wv, wo, heads):
    """sdjax's answer to exercise 3 of notebook 04: the projections of SD's cross-attention around
    :func:`sdjax.attention.attention`. x (B, N, D), context (B, M, D_c) → (B, N, D)."""
    from sdjax.attention import attention

    def split(h):  # (B, T, D) → (B, T, heads, D / heads)
        return h.reshape(*h.shape[:2], heads, -1)

    out = attention(split(x @ wq), split(context @ wk), split(context @ wv), implementation="xla")
    return out.reshape(*x.shape[:2], -1) @ wo


def _attend(q, k, v, heads, scale=None, softmax_axis=-1):
    """Multi-head attention written out, with the knobs the mistakes turn: (B, T, D) each → (B, N, D)."""
    b, n, d = q.shape
    q, k, v = (h.reshape(b, h.shape[1], heads, d // heads).transpose(0, 2, 1, 3) for h in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) * (scale if scale is not None else (d // heads) ** -0.5)
    return (jax.nn.softmax(scores, axis=softmax_axis) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)


@_exercise("04", 3, "cross_attention", _cross_attention)
def check_cross_attention(fn: Callable) -> bool:
    """Exercise: multi-head cross-attention, ``fn(x, context, wq, wk, wv, wo, heads)`` → (B, N, D): queries from the
    image tokens x (B, N, D), keys and values from the text context (B, M, D_c),

        Q = x W_q,  K = c W_k,  V = c W_v,   split D into ``heads`` heads of d = D / heads,
        head_h = softmax(Q_h K_hᵀ / √d) V_h   (softmax over the M keys),   out = concat(heads) W_o,

    W_q, W_o (D, D), W_k, W_v (D_c, D); no biases. Checked against :func:`sdjax.attention.attention`.
    """
    x, c, wq, wk, wv, wo = _inputs(15, (2, 6, 8), (2, 5, 12), (8, 8), (12, 8), (12, 8), (8, 8))
    heads = 2

    def attn(x, c, **kw):
        return _attend(x @ wq, c @ wk, c @ wv, heads, **kw) @ wo

    mistakes = [
        (lambda x, c, *_: attn(x, c, scale=1.0), "scale the scores by 1/√d before the softmax (d = D / heads = 4): "
         "without it the softmax saturates as d grows."),
        (lambda x, c, *_: attn(x, c, scale=1 / 4), "the scores are divided by √d, not d."),
        (lambda x, c, *_: attn(x, c, scale=1 / jnp.sqrt(8.0)), "d is the width of one head, D / heads = 4, not the "
         "full width D = 8."),
        (lambda x, c, *_: _attend(x @ wq, c @ wk, c @ wv, 1, scale=0.5) @ wo, "that is one head of width D; split "
         "Q, K and V into `heads` heads of width D / heads, attend in each, and concatenate."),
        (lambda x, c, *_: attn(x, c, softmax_axis=-2), "the softmax runs over the keys (the M text tokens, the last "
         "axis of the scores): each image token's weights over the prompt sum to 1."),
        (lambda x, c, *_: _attend(x @ wq, c @ wk, c @ wv, heads), "the output projection W_o is missing."),
    ]  # fmt: skip
    return _check("cross_attention", fn, _cross_attention, (x, c, wq, wk, wv, wo, heads), mistakes, atol=1e-5)


@_exercise("04", 2, "guidance", classifier_free_guidance)
def check_guidance(fn: Callable) -> bool:
    """Exercise: classifier-free guidance, ``fn(out_uncond, out_cond, w)`` → ε̂_∅ + w (ε̂_c − ε̂_∅), the
    arrays (B, h, w, 4), w a float. Compared with :func:`sdjax.chain.classifier_free_guidance`."""
    uncond, cond = _inputs(8, (2, 4, 4, 4), (2, 4, 4, 4))
    mistakes = [
        (lambda u, c, w: c + w * (c - u), "that is the paper's convention, (1 + w) ε̂_c − w ε̂_∅, where w = 0 means no "
         "guidance; Stable Diffusion's guidance_scale is 1 + that w: ε̂_∅ + w (ε̂_c − ε̂_∅), so w = 1 means none."),
        (lambda u, c, w: u + w * (u - c), "the sign is flipped: this steers *away* from the prompt. Start from the "
         "unconditional prediction and move towards the conditional one: ε̂_∅ + w (ε̂_c − ε̂_∅)."),
        (lambda u, c, w: w * c, "guidance mixes the two predictions: ε̂_∅ + w (ε̂_c − ε̂_∅), not a rescaled ε̂_c."),
    ]  # fmt: skip
    ok = True
    for w in (7.5, 1.0):
        ok &= _check(f"guidance at w = {w}", fn, classifier_free_guidance, (uncond, cond, w), mistakes)
    return ok


# --- notebook 05 ------------------------------------------------------------------------------------


def _guided_loop(eps_fn, x_T, timesteps, cond, uncond, w, step):
    """sdjax's answer to exercise 1 of notebook 05: the loop of :func:`sdjax.chain` written out, with one batched
    network call per step and :func:`sdjax.chain.classifier_free_guidance`."""
    x = x_T
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        out = eps_fn(jnp.concatenate([x, x]), t, jnp.concatenate([uncond, cond]))
        out_uncond, out_cond = jnp.split(out, 2)
        x = step(x, classifier_free_guidance(out_uncond, out_cond, w), t, t_prev)
    return x


@_exercise("05", 1, "guided_loop", _guided_loop)
def check_guided_loop(fn: Callable) -> bool:
    """Exercise: the denoising loop with classifier-free guidance, ``fn(eps_fn, x_T, timesteps, cond, uncond, w,
    step)`` → x_0. ``eps_fn(x, t, context)`` is the UNet (ε̂ for a batch of latents and contexts), ``timesteps`` a
    descending list of ints, ``cond`` and ``uncond`` the contexts (B, 77, D) of the prompt and of "", ``step(x, eps,
    t, t_prev)`` a sampler's update from t to the next timestep t_prev (−1 after the last: "to x_0"). At each t:

        ε̂ = ε̂(x, t, c_∅) + w (ε̂(x, t, c) − ε̂(x, t, c_∅)),    x ← step(x, ε̂, t, t_prev).

    Checked with a stand-in network and DDIM's step on DDPM's linear schedule. (Both predictions from one call on the
    doubled batch, as SD pipelines do, halves the number of network calls; two calls give the same result.)
    """
    x_T, cond, uncond = _inputs(16, (2, 3, 3, 4), (2, 5, 4), (2, 5, 4))
    ab = jnp.asarray(_DDPM.alphas_cumprod)
    timesteps = [500, 350, 200, 50]
    calls = []

    def eps_fn(x, t, context):  # a stand-in UNet: depends on x, t and the context
        calls.append(len(x))
        return jnp.tanh(x + jnp.mean(context, axis=(1, 2))[:, None, None, None] * (1 + t / 1000))

    def step(x, eps, t, t_prev):  # DDIM, η = 0
        a, a_prev = ab[t], ab[t_prev] if t_prev >= 0 else 1.0
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps

    def loop(guide, last=True, next_t=None, carry=True):
        x = x_T
        for i, t in enumerate(timesteps if last else timesteps[:-1]):
            t_prev = (timesteps[i + 1] if i + 1 < len(timesteps) else -1) if next_t is None else next_t(t)
            x = step(x, guide(eps_fn(x if carry else x_T, t, uncond), eps_fn(x if carry else x_T, t, cond)), t, t_prev)
        return x

    mistakes = [
        (lambda *_: loop(lambda u, c: c), "the guidance is missing: that samples with ε̂(x, t, c) alone (w = 1). "
         "Combine both predictions: ε̂_∅ + w (ε̂_c − ε̂_∅)."),
        (lambda *_: loop(lambda u, c: u + 7.5 * (u - c)), "the guidance points away from the prompt: ε̂_∅ + w (ε̂_c − "
         "ε̂_∅), from the unconditional prediction towards the conditional one."),
        (lambda *_: loop(lambda u, c: c + 7.5 * (c - u)), "that is the paper's (1 + w) ε̂_c − w ε̂_∅; SD's scale w "
         "is ε̂_∅ + w (ε̂_c − ε̂_∅)."),
        (lambda *_: loop(lambda u, c: u + 7.5 * (c - u), last=False), "the last step is missing: the chain ends at "
         "the last timestep of the list instead of x_0; step from it too, to t_prev = −1."),
        (lambda *_: loop(lambda u, c: u + 7.5 * (c - u), next_t=lambda t: t - 1), "step to the *next timestep of the "
         "list* (t_prev = timesteps[i + 1]), not to t − 1: here 500 → 350 → 200 → 50 → x_0."),
        (lambda *_: loop(lambda u, c: u + 7.5 * (c - u), carry=False), "x must carry over from step to step: each "
         "step starts where the previous one ended, not from x_T."),
    ]  # fmt: skip
    ok = _check("guided_loop", fn, _guided_loop, (eps_fn, x_T, timesteps, cond, uncond, 7.5, step), mistakes)
    calls.clear()
    fn(eps_fn, x_T, timesteps, cond, uncond, 7.5, step)
    if len(calls) == 2 * len(timesteps):
        print("  (two network calls per step; one call on the doubled batch, jnp.concatenate([x, x]) with "
              "jnp.concatenate([uncond, cond]), gives the same result in half the calls.)")
    return ok


def _latents_to_image(decode, z, scaling_factor):
    """sdjax's answer to exercise 2 of notebook 05: what :class:`sdjax.StableDiffusion` does to its final
    latents, images = clip((D(z / s) + 1) / 2, 0, 1). z (N, h, w, 4) → (N, 8h, 8w, 3) in [0, 1]."""
    return jnp.clip((decode(z / scaling_factor) + 1) / 2, 0.0, 1.0)


@_exercise("05", 2, "latents_to_image", _latents_to_image)
def check_latents_to_image(fn: Callable) -> bool:
    """Exercise: SD's last stage, ``fn(decode, z, scaling_factor)`` → images in [0, 1]: undo the scaling,
    decode, and map the decoder's [−1, 1] to pixel values,

        x = D(z / s),    image = clip((x + 1) / 2, 0, 1),

    z (N, h, w, 4) the final latents, ``decode`` the VAE decoder D: (N, h, w, 4) → (N, 8h, 8w, 3). Checked
    with a stand-in decoder whose outputs go slightly past [−1, 1], so that the clipping matters.
    """
    (z,) = _inputs(9, (2, 2, 2, 4))
    z = 0.3 * z

    def decode(latents):  # a stand-in for the VAE: 8× nearest upsampling of 3 channels, a little past ±1
        x = jnp.repeat(jnp.repeat(latents[..., :3], 8, axis=1), 8, axis=2)
        return 1.2 * jnp.tanh(x)

    mistakes = [
        (lambda d, z, s: jnp.clip((d(z * s) + 1) / 2, 0, 1), "the latents were multiplied by s when they were "
         "encoded (z = s·E(x)); to decode, divide: D(z / s)."),
        (lambda d, z, s: jnp.clip((d(z) + 1) / 2, 0, 1), "undo the scaling factor first: the decoder expects "
         "E(x) = z / s, not the scaled z."),
        (lambda d, z, s: jnp.clip(d(z / s), 0, 1), "the decoder's output lies in [−1, 1]: map it to [0, 1] with "
         "(x + 1) / 2 before clipping (clipping alone turns every dark value black)."),
        (lambda d, z, s: (d(z / s) + 1) / 2, "clip to [0, 1]: the decoder can overshoot ±1 a little, and an image "
         "library would wrap or reject those values."),
    ]  # fmt: skip
    return _check("latents_to_image", fn, _latents_to_image, (decode, z, 0.18215), mistakes)


def _lora_forward(x, W, b, A, B, alpha, scale):
    """sdjax's answer to exercise 1 of notebook 07: :class:`sdjax.lora.LoRALinear` itself, built around the frozen
    layer (W, b) with the adapter (A, B). x (N, d_in), W (d_in, d_out), b (d_out,), A (d_in, r), B (r, d_out)."""
    from flax import nnx

    from sdjax import lora

    base = nnx.Linear(*W.shape, rngs=nnx.Rngs(0))
    base.kernel.set_value(W)
    base.bias.set_value(b)
    layer = lora.LoRALinear(base, rank=A.shape[1], alpha=alpha, scale=scale, rngs=None)
    layer.lora_A.set_value(A)
    layer.lora_B.set_value(B)
    return layer(x)


@_exercise("07", 1, "lora_forward", _lora_forward)
def check_lora_forward(fn: Callable) -> bool:
    """Exercise: a LoRA layer's forward pass, ``fn(x, W, b, A, B, alpha, scale)`` → y:

        y = x W + b + s · (α / r) · (x A) B,    r = A.shape[1] (the rank),

    x (N, d_in), W (d_in, d_out) and b (d_out,) the frozen layer, A (d_in, r) and B (r, d_out) the adapter,
    α its alpha and s the strength. Checked against :class:`sdjax.lora.LoRALinear` itself.
    """
    x, w, b, a, bb = _inputs(10, (3, 6), (6, 5), (5,), (6, 2), (2, 5))
    alpha, scale = 4.0, 0.7
    r = 2
    mistakes = [
        (lambda x, w, b, a, bb, al, s: x @ w + b + s * (x @ a) @ bb, "scale the update by α / r as well as by s: "
         "with α = r it is 1, here α = 4 and r = 2."),
        (lambda x, w, b, a, bb, al, s: x @ w + b + s * al * (x @ a) @ bb, "divide α by the rank r = A.shape[1]: "
         "the update is s · (α / r) · x A B."),
        (lambda x, w, b, a, bb, al, s: s * al / r * (x @ a) @ bb, "LoRA adds to the frozen layer: keep x W + b."),
        (lambda x, w, b, a, bb, al, s: x @ (w + s * al / r * a @ bb), "the bias b of the frozen layer is missing."),
    ]  # fmt: skip
    return _check("lora_forward", fn, _lora_forward, (x, w, b, a, bb, alpha, scale), mistakes)


def _merge_lora(W, A, B, alpha, scale):
    """sdjax's answer to exercise 2 of notebook 07: the kernel :meth:`sdjax.lora.LoRALinear.fuse` leaves,
    W + s · (α / r) · A B. W (d_in, d_out), A (d_in, r), B (r, d_out) → (d_in, d_out)."""
    from flax import nnx

    from sdjax import lora

    base = nnx.Linear(*W.shape, use_bias=False, rngs=nnx.Rngs(0))
    base.kernel.set_value(W)
    layer = lora.LoRALinear(base, rank=A.shape[1], alpha=alpha, scale=scale, rngs=None)
    layer.lora_A.set_value(A)
    layer.lora_B.set_value(B)
    layer.fuse()
    return layer.kernel[...]


@_exercise("07", 2, "merge_lora", _merge_lora)
def check_merge_lora(fn: Callable) -> bool:
    """Exercise: merge (fuse) an adapter into its layer's kernel, ``fn(W, A, B, alpha, scale)`` → W',

        W' = W + s · (α / r) · A B,    r = A.shape[1],

    so that x W' + b is the LoRA layer's output (exercise 1) and the adapter costs nothing at inference.
    W (d_in, d_out), A (d_in, r), B (r, d_out). Checked against :meth:`sdjax.lora.LoRALinear.fuse`.
    """
    w, a, bb = _inputs(18, (6, 5), (6, 2), (2, 5))
    alpha, scale = 4.0, 0.7
    mistakes = [
        (lambda w, a, b, al, s: w + s * a @ b, "scale the update by α / r as well as by s (α = 4, r = 2 here)."),
        (lambda w, a, b, al, s: w + s * al * a @ b, "divide α by the rank r = A.shape[1]: W + s · (α / r) · A B."),
        (lambda w, a, b, al, s: w + al / 2 * a @ b, "the strength s is missing: W + s · (α / r) · A B (s = 0 must "
         "give the base W back)."),
        (lambda w, a, b, al, s: w - s * al / 2 * a @ b, "the update is added: subtracting it is what *unfusing* "
         "does."),
        (lambda w, a, b, al, s: s * al / 2 * a @ b, "the merged kernel keeps the frozen W: W' = W + ΔW, not ΔW alone."),
    ]  # fmt: skip
    got = _run("merge_lora", fn, (w, a, bb, alpha, scale))
    if got.shape == (5, 6):
        raise ExerciseError(
            "merge_lora: the result has shape (d_out, d_in) = (5, 6); in sdjax's layout (y = x W) the kernel is "
            "(d_in, d_out) = (6, 5) and the update is A @ B, not (A @ B)ᵀ or B.T @ A.T."
        )
    return _check("merge_lora", fn, _merge_lora, (w, a, bb, alpha, scale), mistakes)
