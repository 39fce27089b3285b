"""Each exercise check passes sdjax's own solution and rejects the plausible wrong answers with a
message that says what is wrong; the stripper turns solutions into placeholders."""

import json
import re

import jax
import jax.numpy as jnp
import pytest

from sdjax import editions
from sdjax import exercises as ex
from sdjax.exercises import core
from sdjax.models.autoencoder import reconstruction_loss
from sdjax.models.vae import kl_divergence, reparameterize, vae_loss
from sdjax.nn import upsample_nearest


def per_image(c):
    return c[:, None, None, None]


def q_sample(x0, t, noise, ab):
    return per_image(jnp.sqrt(ab[t])) * x0 + per_image(jnp.sqrt(1 - ab[t])) * noise


def ddpm_mean(x, e, t, b, ab):
    return (x - b[t] / jnp.sqrt(1 - ab[t]) * e) / jnp.sqrt(1 - b[t])


def ddpm_step(x, e, t, b, ab, z):
    if t == 0:
        return ddpm_mean(x, e, t, b, ab)
    return ddpm_mean(x, e, t, b, ab) + jnp.sqrt((1 - ab[t - 1]) / (1 - ab[t]) * b[t]) * z


def noise(x, e, t, b, ab, z):
    """The σ_t z term of the correct step."""
    return ddpm_step(x, e, t, b, ab, z) - ddpm_mean(x, e, t, b, ab)


def euler_step(x, x0_hat, sigma, sigma_next):
    return x + (sigma_next - sigma) * (x - x0_hat) / sigma


def silu_block(b, x, act=jax.nn.silu, skip=True):
    """A ResnetBlock's forward written out, with the knobs the tests' wrong answers turn."""
    h = b.conv2(act(b.norm2(b.conv1(act(b.norm1(x))))))
    return (x if b.conv_shortcut is None else b.conv_shortcut(x)) + h if skip else h


def v_loss(model, x0, t, noise, ab, target="v"):
    a = per_image(ab[t])
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
    v = jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0
    want = {"v": v, "eps": noise, "-v": -v}
    return jnp.mean((model(x_t, t) - want[target]) ** 2)


def mha(x, c, wq, wk, wv, wo, heads, scale_by=None, out=True):
    b, n, d = x.shape
    q, k, v = (h.reshape(b, h.shape[1], heads, d // heads) for h in (x @ wq, c @ wk, c @ wv))
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / (jnp.sqrt(d // heads) if scale_by is None else scale_by)
    o = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v).reshape(b, n, d)
    return o @ wo if out else o


def guided(eps_fn, x, ts, c, u, w, step, combine=lambda e_u, e_c, w: e_u + w * (e_c - e_u), last=True):
    steps = ts if last else ts[:-1]
    for i, t in enumerate(steps):
        e_u, e_c = eps_fn(x, t, u), eps_fn(x, t, c)
        x = step(x, combine(e_u, e_c, w), t, ts[i + 1] if i + 1 < len(ts) else -1)
    return x


def heun(D, x, s, s1, corrector=True, at_next=True):
    d = (x - D(x, s)) / s
    x_e = x + (s1 - s) * d
    if s1 == 0 or not corrector:
        return x_e
    s2 = s1 if at_next else s
    return x + (s1 - s) * (d + (x_e - D(x_e, s2)) / s2) / 2


def clip_ce(logits):  # mean_i (log Σ_j exp ℓ_ij − ℓ_ii), written independently of optax
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diag(logits))


CASES = {
    "upsample_nearest": (
        ex.check_upsample_nearest,
        upsample_nearest,
        [
            (lambda x: jnp.tile(x, (1, 2, 2, 1)), "each pixel"),
            (lambda x: jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1), "axes 1 and 2"),
            (lambda x: jnp.repeat(x, 2, axis=1), "only H was doubled"),
            (
                lambda x: jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), "bilinear"),
                "bilinear",
            ),
        ],
    ),
    "reconstruction_loss": (
        ex.check_reconstruction_loss,
        reconstruction_loss,
        [
            (lambda x, y: jnp.sum((x - y) ** 2), "take the mean"),
            (lambda x, y: jnp.mean(jnp.abs(x - y)), "absolute"),
            (lambda x, y: jnp.mean((x - y) ** 2, axis=(1, 2, 3)), "one loss per image"),
        ],
    ),
    "reparameterize": (
        ex.check_reparameterize,
        reparameterize,
        [
            (lambda m, lv, e: m + jnp.exp(lv) * e, "the variance"),
            (lambda m, lv, e: m + lv * e, "logvar is log σ²"),
            (lambda m, lv, e: jnp.exp(0.5 * lv) * e, "mean μ is missing"),
        ],
    ),
    "kl_divergence": (
        ex.check_kl_divergence,
        kl_divergence,
        [
            (lambda m, lv: jnp.sum(m**2 + jnp.exp(lv) - 1 - lv, axis=(1, 2, 3)), "factor ½"),
            (lambda m, lv: 0.5 * jnp.mean(m**2 + jnp.exp(lv) - 1 - lv, axis=(1, 2, 3)), "*sum*"),
            (lambda m, lv: 0.5 * jnp.sum(m**2 + jnp.exp(lv) - 1 - lv), "shape (B,)"),
            (lambda m, lv: -0.5 * jnp.sum(m**2 + jnp.exp(lv) - 1 - lv, axis=(1, 2, 3)), "never negative"),
        ],
    ),
    "q_sample": (
        ex.check_q_sample,
        q_sample,
        [
            (lambda x, t, n, ab: per_image(ab[t]) * x + per_image(1 - ab[t]) * n, "square roots"),
            (lambda x, t, n, ab: per_image(jnp.sqrt(1 - ab[t])) * x + per_image(jnp.sqrt(ab[t])) * n, "swapped"),
            (lambda x, t, n, ab: q_sample(x, t - 1, n, ab), "off by one"),
        ],
    ),
    "ddpm_step": (
        ex.check_ddpm_step,
        ddpm_step,
        [
            (lambda x, e, t, b, ab, z: ddpm_mean(x, e, t, b, ab) + (t > 0) * jnp.sqrt(b[t]) * z, "fixed_large"),
            (
                lambda x, e, t, b, ab, z: (
                    (x - b[t] / jnp.sqrt(1 - ab[t]) * e) / jnp.sqrt(ab[t]) + noise(x, e, t, b, ab, z)
                ),
                "√α_t",
            ),
            (
                lambda x, e, t, b, ab, z: (x - b[t] / (1 - ab[t]) * e) / jnp.sqrt(1 - b[t]) + noise(x, e, t, b, ab, z),
                "square root is missing",
            ),
        ],
    ),
    "euler_step": (
        ex.check_euler_step,
        euler_step,
        [
            (lambda x, d0, s, s1: x + (s - s1) * (x - d0) / s, "wrong way"),
            (lambda x, d0, s, s1: x + (s1 - s) * (x - d0), "divide by σ"),
            (lambda x, d0, s, s1: x + (s1 - s) * (x - d0) / s**2, "σ²"),
            (lambda x, d0, s, s1: x + (s1 - s) * (x - d0) / s1, "not at σ_next"),
            (lambda x, d0, s, s1: d0 + s1 * (x - d0), "ε̂ = (x − x̂_0)/σ"),
        ],
    ),
    "clip_loss": (
        ex.check_clip_loss,
        lambda u, w, s: 0.5 * (clip_ce(s * u @ w.T) + clip_ce(s * (u @ w.T).T)),
        [
            (lambda u, w, s: clip_ce(s * u @ w.T), "one direction only"),
            (lambda u, w, s: 0.5 * (clip_ce(u @ w.T) + clip_ce(w @ u.T)), "multiply the cosine similarities"),
            (lambda u, w, s: clip_ce(s * u @ w.T) + clip_ce(s * w @ u.T), "averaged (½ each), not summed"),
            (lambda u, w, s: -jnp.mean(jnp.diag(s * u @ w.T)), "a cross-entropy over all B"),
        ],
    ),
    "latents_to_image": (
        ex.check_latents_to_image,
        lambda d, z, s: jnp.minimum(jnp.maximum(d(z / s) * 0.5 + 0.5, 0.0), 1.0),
        [
            (lambda d, z, s: jnp.clip((d(z * s) + 1) / 2, 0, 1), "divide: D(z / s)"),
            (lambda d, z, s: jnp.clip((d(z) + 1) / 2, 0, 1), "undo the scaling factor first"),
            (lambda d, z, s: jnp.clip(d(z / s), 0, 1), "map it to [0, 1]"),
            (lambda d, z, s: (d(z / s) + 1) / 2, "clip to [0, 1]"),
        ],
    ),
    "lora_forward": (
        ex.check_lora_forward,
        lambda x, w, b, a, bb, alpha, s: x @ (w + s * alpha / a.shape[1] * a @ bb) + b,  # the fused form
        [
            (lambda x, w, b, a, bb, al, s: x @ w + b + s * (x @ a) @ bb, "scale the update by α / r"),
            (lambda x, w, b, a, bb, al, s: x @ w + b + s * al * (x @ a) @ bb, "divide α by the rank"),
            (lambda x, w, b, a, bb, al, s: s * al / 2 * (x @ a) @ bb, "keep x W + b"),
            (lambda x, w, b, a, bb, al, s: x @ (w + s * al / 2 * a @ bb), "the bias b"),
        ],
    ),
    "guidance": (
        ex.check_guidance,
        lambda u, c, w: (1 - w) * u + w * c,  # the same combination, written as a mixture
        [
            (lambda u, c, w: c + w * (c - u), "the paper's convention"),
            (lambda u, c, w: u + w * (u - c), "the sign is flipped"),
            (lambda u, c, w: w * c, "not a rescaled"),
        ],
    ),
    "resnet_block": (
        ex.check_resnet_block,
        silu_block,
        [
            (lambda b, x: silu_block(b, x, skip=False), "skip connection is missing"),
            (lambda b, x: silu_block(b, x, act=jax.nn.relu), "that is ReLU"),
            (lambda b, x: jax.nn.silu(silu_block(b, x)), "no nonlinearity after the addition"),
            (lambda b, x: x + silu_block(b, x, skip=False), "the skip path is block.conv_shortcut(x)"),
        ],
    ),
    "negative_elbo": (
        ex.check_negative_elbo,
        lambda m, x, k, beta: vae_loss(m, {"image": x}, k, kl_weight=beta)[0],
        [
            (lambda m, x, k, beta: vae_loss(m, {"image": x}, k, kl_weight=1.0)[0], "weighted by β"),
            (lambda m, x, k, beta: vae_loss(m, {"image": x}, k, kl_weight=0.0)[0], "the KL term is missing"),
            (
                lambda m, x, k, beta: jnp.mean(
                    jnp.sum((x - m.decode(m.encode(x).mean)) ** 2, axis=(1, 2, 3))
                    + beta * kl_divergence(m.encode(x).mean, m.encode(x).logvar)
                ),
                "decode a *sample*",
            ),
            (lambda m, x, k, beta: len(x) * vae_loss(m, {"image": x}, k, kl_weight=beta)[0], "average over the batch"),
        ],
    ),
    "training_loss": (
        ex.check_training_loss,
        v_loss,
        [
            (lambda m, x, t, n, ab: v_loss(m, x, t, n, ab, "eps"), "ε-prediction target"),
            (lambda m, x, t, n, ab: v_loss(m, x, t, n, ab, "-v"), "sign of v is flipped"),
            (lambda m, x, t, n, ab: v_loss(lambda x_t, t: m(x_t, t + 1), x, t, n, ab), "0-indexed"),
        ],
    ),
    "cross_attention": (
        ex.check_cross_attention,
        mha,
        [
            (lambda *a: mha(*a, scale_by=1.0), "scale the scores by 1/√d"),
            (lambda *a: mha(*a, scale_by=jnp.sqrt(8.0)), "the width of one head"),
            (lambda *a: mha(*a, out=False), "output projection W_o is missing"),
            (lambda x, c, wq, wk, wv, wo, h: mha(x, c, wq, wk, wv, wo, 1, scale_by=2.0), "one head of width D"),
        ],
    ),
    "guided_loop": (
        ex.check_guided_loop,
        guided,
        [
            (lambda *a: guided(*a, combine=lambda u, c, w: c), "the guidance is missing"),
            (lambda *a: guided(*a, combine=lambda u, c, w: u + w * (u - c)), "points away from the prompt"),
            (lambda *a: guided(*a, last=False), "the last step is missing"),
        ],
    ),
    "heun_step": (
        ex.check_heun_step,
        heun,
        [
            (lambda *a: heun(*a, corrector=False), "Euler's step alone"),
            (lambda *a: heun(*a, at_next=False), "the *new* noise level"),
            (
                lambda D, x, s, s1: x + (s1 - s) * ((x - D(x, s)) / s + (x - D(x, s) * 0 - D(x, s1)) / s1) / 2,
                "not the expected values",
            ),
        ],
    ),
    "merge_lora": (
        ex.check_merge_lora,
        lambda w, a, b, alpha, s: w + s * alpha / a.shape[1] * jnp.einsum("ir,ro->io", a, b),
        [
            (lambda w, a, b, alpha, s: w + s * a @ b, "scale the update by α / r"),
            (lambda w, a, b, alpha, s: w + alpha / 2 * a @ b, "the strength s is missing"),
            (lambda w, a, b, alpha, s: w - s * alpha / 2 * a @ b, "*unfusing*"),
            (lambda w, a, b, alpha, s: (w + s * alpha / 2 * a @ b).T, "(d_out, d_in)"),
        ],
    ),
    "quantize": (
        ex.check_quantize,
        lambda z, e: z + jax.lax.stop_gradient(e[jnp.argmin(jnp.sum((z[..., None, :] - e) ** 2, -1), -1)] - z),
        [
            (lambda z, e: e[jnp.argmin(jnp.sum((z[..., None, :] - e) ** 2, -1), -1)], "no gradient reaches z"),
            (lambda z, e: e[jnp.argmax(jnp.einsum("...d,kd->...k", z, e), -1)], "keeps the ‖e‖² term"),
            (lambda z, e: e[jnp.argmax(jnp.sum((z[..., None, :] - e) ** 2, -1), -1)], "*farthest* code"),
            (lambda z, e: e[jnp.argmin(jnp.sum((z[..., None, :] - e) ** 2, -1), -1)]
             + 0.5 * (z - jax.lax.stop_gradient(z)), "not the identity"),
        ],
    ),
    "noisy_pyramid": (
        ex.check_noisy_pyramid,
        lambda x, t, noises, a: [
            jnp.sqrt(a[t][:, None, None, None]) * x.reshape(x.shape[0], x.shape[1] // f, f, x.shape[2] // f, f, -1)
            .mean(axis=(2, 4)) + jnp.sqrt(1 - a[t][:, None, None, None]) * e
            for f, e in zip((4, 2, 1), noises)
        ],
        [
            (lambda x, t, n, a: [jnp.sqrt(a[t][:, None, None, None]) * x[:, ::f, ::f]
                                 + jnp.sqrt(1 - a[t][:, None, None, None]) * e for f, e in zip((4, 2, 1), n)],
             "block average"),
            (lambda x, t, n, a: [jnp.sqrt(a[t][:, None, None, None]) * x.reshape(2, 8 // f, f, 8 // f, f, 3)
                                 .mean(axis=(2, 4)) + (1 - a[t][:, None, None, None]) * e
                                 for f, e in zip((4, 2, 1), n)], "not (1 − ᾱ_t)"),
        ],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_check_passes_the_solution(name, capsys):
    check, solution, _ = CASES[name]
    assert check(solution) is True
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("name,i", [(n, i) for n, c in CASES.items() for i in range(len(c[2]))])
def test_check_explains_a_plausible_mistake(name, i):
    check, _, mistakes = CASES[name]
    wrong, says = mistakes[i]
    with pytest.raises(ex.ExerciseError, match=f"^{name}( at [^:]+)?: .*{re.escape(says)}"):
        check(wrong)


@pytest.mark.parametrize("name", CASES)
def test_unfinished_exercise_and_crash_are_explained(name):
    check = CASES[name][0]
    with pytest.raises(ex.ExerciseError, match="returned None"):
        check(lambda *a: None)
    with pytest.raises(ex.ExerciseError, match="raised ZeroDivisionError"):
        check(lambda *a: 1 / 0)


def test_euler_step_check_accepts_the_ddim_form():
    # the same step as DDIM writes it: jump to x̂_0, re-noise with the predicted noise ε̂ = (x − x̂_0)/σ
    assert ex.check_euler_step(lambda x, d0, s, s1: d0 + s1 * (x - d0) / s) is True


def test_unrecognised_wrong_answer_gets_values_to_compare():
    with pytest.raises(ex.ExerciseError, match="largest difference"):
        ex.check_reparameterize(lambda m, lv, e: m + 0.9 * jnp.exp(0.5 * lv) * e)


def test_reparameterize_check_requires_a_gradient_through_mu():
    with pytest.raises(ex.ExerciseError, match="∂z/∂μ"):
        ex.check_reparameterize(lambda m, lv, e: jax.lax.stop_gradient(m) + jnp.exp(0.5 * lv) * e)


def test_strip_solutions(tmp_path):
    source = (
        "import jax.numpy as jnp\n\n"
        "def f(x):\n"
        "    # BEGIN SOLUTION\n"
        "    y = x * 2\n"
        "    return y\n"
        "    # END SOLUTION\n\n"
        "check(f)\n"
    )
    stripped = editions.strip_source(source)
    assert stripped == "import jax.numpy as jnp\n\ndef f(x):\n    ...  # YOUR CODE HERE\n\ncheck(f)\n"
    with pytest.raises(ValueError, match="unbalanced"):
        editions.strip_source("# BEGIN SOLUTION\nx = 1\n")

    nb = {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": ["# BEGIN SOLUTION is just text here"]},
            {
                "cell_type": "code",
                "metadata": {},
                "source": source.splitlines(True),
                "outputs": [{"x": 1}],
                "execution_count": 3,
            },
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (tmp_path / "a.ipynb").write_text(json.dumps(nb))
    assert editions.strip_notebook(tmp_path / "a.ipynb", tmp_path / "out" / "a.ipynb") == 1
    out = json.loads((tmp_path / "out" / "a.ipynb").read_text())
    assert "y = x * 2" not in "".join(out["cells"][1]["source"])
    assert out["cells"][1]["outputs"] == [] and out["cells"][1]["execution_count"] is None
    assert out["cells"][0] == nb["cells"][0]


def placeholder(*args):
    "What an exercise's function is in the student edition before the learner writes it."
    ...  # YOUR CODE HERE


@pytest.mark.parametrize("name", CASES)
def test_open_exercise_is_reported_not_raised(name, capsys, monkeypatch):
    monkeypatch.setattr(core, "verdicts", {})
    exercise = ex.EXERCISES[name]
    assert CASES[name][0](placeholder) is False
    assert capsys.readouterr().out == (
        f"○ exercise {exercise.number} of notebook {exercise.notebook} ({name}) is still open: write the body of "
        f"{name} in place of `...  # YOUR CODE HERE` (and `return` the result), run its cell, then this check again.\n"
    )
    assert core.verdicts == {name: "open"}


def test_strip_source_writes_the_placeholder_the_checks_recognise():
    assert editions.strip_source("def f(x):\n    # BEGIN SOLUTION\n    return x\n    # END SOLUTION\n") == (
        f"def f(x):\n    {ex.PLACEHOLDER}\n"
    )


@pytest.mark.parametrize("name", CASES)
def test_sdjax_version_passes_its_check(name):
    # what a notebook uses in place of an open exercise: sdjax's answer, with the exercise's signature
    assert CASES[name][0](ex.sdjax_version(name)) is True


def test_every_exercise_is_registered_once():
    assert sorted(ex.EXERCISES) == sorted(CASES)
    assert len({(e.notebook, e.number) for e in ex.EXERCISES.values()}) == len(CASES)
    with pytest.raises(KeyError, match="no exercise named 'q_smaple'; the exercises are resnet_block"):
        ex.sdjax_version("q_smaple")


def test_summary_lists_correct_wrong_open_and_unchecked(capsys, monkeypatch):
    monkeypatch.setattr(core, "verdicts", {})
    ex.check_q_sample(CASES["q_sample"][1])
    with pytest.raises(ex.ExerciseError):
        ex.check_ddpm_step(CASES["ddpm_step"][2][0][0])
    ex.check_euler_step(placeholder)
    capsys.readouterr()
    ex.summary("03")
    assert capsys.readouterr().out.splitlines() == [
        "Exercises, notebook 03: 1 of 3 correct.",
        "  ✓ exercise 1 of notebook 03 (q_sample): correct",
        "  · exercise 2 of notebook 03 (training_loss): not checked yet: run its check cell",
        "  ✗ exercise 3 of notebook 03 (ddpm_step): wrong: ddpm_step at t=500: σ_t² = β_t is DDPM's other choice "
        '("fixed_large"); this exercise asks for the posterior variance β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t.',
    ]
    ex.summary()
    assert capsys.readouterr().out.splitlines()[0] == "Exercises, checked so far: 1 of 3 correct."
    ex.summary("02")
    unchecked = "· exercise 1 of notebook 02 (reparameterize): not checked yet: run its check cell"
    assert unchecked in capsys.readouterr().out
    ex.summary("99")
    assert capsys.readouterr().out == "notebook 99 has no exercises\n"
