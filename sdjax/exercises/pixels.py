"""The checks of notebooks 01–03: the autoencoder's blocks and loss, the VAE's sample, KL and ELBO, and pixel
diffusion's forward process, training loss and DDPM step (:mod:`sdjax.exercises` says how checks work)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.exercises.core import LINEAR, ExerciseError, check, inputs, register
from sdjax.models.autoencoder import reconstruction_loss
from sdjax.models.vae import kl_divergence, reparameterize, vae_loss
from sdjax.nn import ResnetBlock, upsample_nearest
from sdjax.schedulers import ddpm_step, q_sample, training_target

# --- notebook 01 ------------------------------------------------------------------------------------


def _resnet_block(block, x):
    """sdjax's answer to exercise 1 of notebook 01: :class:`sdjax.nn.ResnetBlock` itself, ``block(x)``."""
    return block(x)


def _post_activation(block, x):
    h = jax.nn.silu(block.norm2(block.conv2(jax.nn.silu(block.norm1(block.conv1(x))))))
    return (x if block.conv_shortcut is None else block.conv_shortcut(x)) + h


@register("01", 1, "resnet_block", _resnet_block)
def check_resnet_block(fn: Callable) -> bool:
    """Exercise: wire a ResnetBlock's forward pass from its layers, ``fn(block, x)`` → y, with ``block`` an
    untrained :class:`sdjax.nn.ResnetBlock` (no time embedding) and x (B, H, W, C_in):

        h = conv1(SiLU(norm1(x))),    h = conv2(SiLU(norm2(h))),    y = shortcut(x) + h,

    shortcut = ``block.conv_shortcut`` (a 1×1 convolution) when C_in ≠ C_out, else the identity. Checked on a
    block that changes the channels (4 → 8) and on one that keeps them (8 → 8).
    """
    from flax import nnx

    (x,) = inputs(11, (2, 6, 6, 4))
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
    ok = check("resnet_block", fn, _resnet_block, (keep, jnp.concatenate([x, x], axis=-1)), mistakes + post, atol=1e-5)
    try:  # (swapped norms or post-activation cannot run on a block that changes the channels)
        return ok & check("resnet_block at 4 → 8 channels", fn, _resnet_block, (widen, x), mistakes[:4], atol=1e-5)
    except ExerciseError as e:
        if "raised" in str(e) and ("broadcast" in str(e) or "Incompatible shapes" in str(e)):
            raise ExerciseError(
                "resnet_block at 4 → 8 channels: x (4 channels) cannot be added to h (8 channels): when C_in ≠ C_out "
                "the skip path is block.conv_shortcut(x), a 1×1 convolution to C_out channels."
            ) from e
        raise


@register("01", 2, "upsample_nearest", upsample_nearest)
def check_upsample_nearest(fn: Callable) -> bool:
    """Exercise: nearest-neighbour ×2 upsampling of an NHWC batch, (B, H, W, C) → (B, 2H, 2W, C)."""
    (x,) = inputs(0, (2, 3, 5, 4))
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
    return check("upsample_nearest", fn, upsample_nearest, (x,), mistakes)


@register("01", 3, "reconstruction_loss", reconstruction_loss)
def check_reconstruction_loss(fn: Callable) -> bool:
    """Exercise: the autoencoder's loss, the mean squared error over all pixels (a scalar)."""
    x, x_hat = inputs(1, (4, 8, 8, 3), (4, 8, 8, 3))
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
    return check("reconstruction_loss", fn, reconstruction_loss, (x, x_hat), mistakes)


# --- notebook 02 ------------------------------------------------------------------------------------


@register("02", 1, "reparameterize", reparameterize)
def check_reparameterize(fn: Callable) -> bool:
    """Exercise: z = μ + σ ⊙ ε with σ = exp(½ · logvar)."""
    mean, logvar, eps = inputs(2, (3, 4, 4, 2), (3, 4, 4, 2), (3, 4, 4, 2))
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
    ok = check("reparameterize", fn, reparameterize, (mean, logvar, eps), mistakes)
    # The point of the trick: z is differentiable in μ and σ. dz/dμ summed = number of elements.
    grad = jax.grad(lambda m: jnp.sum(fn(m, logvar, eps)))(mean)
    if not np.allclose(grad, 1.0):
        raise ExerciseError("reparameterize: ∂z/∂μ should be 1 everywhere; is the gradient flowing through μ?")
    return ok


@register("02", 2, "kl_divergence", kl_divergence)
def check_kl_divergence(fn: Callable) -> bool:
    """Exercise: KL(N(μ, σ²) ‖ N(0, 1)) summed over all but the batch axis, one value per example."""
    mean, logvar = inputs(3, (3, 4, 4, 2), (3, 4, 4, 2))
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
    return check("kl_divergence", fn, kl_divergence, (mean, logvar), mistakes)


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


@register("02", 3, "negative_elbo", _negative_elbo)
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
    (x,) = inputs(13, (3, 8, 8, 3))
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
    return check("negative_elbo", fn, _negative_elbo, (model, x, key, beta), mistakes, rtol=1e-5, atol=1e-4)


# --- notebook 03 ------------------------------------------------------------------------------------



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


@register("03", 1, "q_sample", _q_sample)
def check_q_sample(fn: Callable) -> bool:
    """Exercise: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, with ``fn(x0, t, noise, alphas_cumprod)``.

    x0, noise (B, H, W, C); t (B,) int, one timestep per image; alphas_cumprod (T,) → (B, H, W, C).
    """
    x0, noise = inputs(4, (5, 4, 4, 3), (5, 4, 4, 3))
    t = jnp.array([0, 10, 250, 600, 999])
    ab = jnp.asarray(LINEAR.alphas_cumprod)

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
    return check("q_sample", fn, lambda x, t, n, ab: q_sample(LINEAR, x, t, n), (x0, t, noise, ab), mistakes)


_V = dataclasses.replace(LINEAR, prediction_type="v_prediction")


def _training_loss(model, x0, t, noise, alphas_cumprod):
    """sdjax's answer to exercise 2 of notebook 03: the body of :func:`sdjax.diffusion.diffusion_loss` for
    v-prediction, with t and ε given. ``alphas_cumprod`` is the table of ``_V``, the schedule the check uses."""
    del alphas_cumprod  # sdjax reads ᾱ_t from the schedule; the check passes that schedule's table
    x_t = q_sample(_V, x0, t, noise)
    return jnp.mean((model(x_t, t) - training_target(_V, x0, t, noise)) ** 2)


@register("03", 2, "training_loss", _training_loss)
def check_training_loss(fn: Callable) -> bool:
    """Exercise: the training loss of this notebook's model, ``fn(model, x0, t, noise, alphas_cumprod)`` → a scalar:
    noise x_0 to level t, ask the network for v, and take the mean squared error,

        x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,    v = √ᾱ_t ε − √(1 − ᾱ_t) x_0,    L = mean (model(x_t, t) − v)²,

    x0, noise (B, H, W, C), t (B,) int, ``model(x, t)`` → (B, H, W, C). Checked against sdjax's
    :func:`~sdjax.schedulers.q_sample` and :func:`~sdjax.schedulers.training_target` with a stand-in network.
    """
    x0, noise = inputs(14, (4, 5, 5, 3), (4, 5, 5, 3))
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
    return check("training_loss", fn, _training_loss, (model, x0, t, noise, ab), mistakes)


@register("03", 3, "ddpm_step", _ddpm_step)
def check_ddpm_step(fn: Callable) -> bool:
    """Exercise: one DDPM ancestral step (Algorithm 2), ``fn(x_t, eps_hat, t, betas, alphas_cumprod, z)``:

        x_{t−1} = 1/√α_t · (x_t − β_t/√(1 − ᾱ_t) · ε̂) + σ_t z,   σ_t² = β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t,

    with ᾱ_{−1} = 1, so that σ_0 = 0: the last step adds no noise. x_t, eps_hat, z (B, H, W, C); t a Python int; betas,
    alphas_cumprod (T,) → x_{t−1} (B, H, W, C). Checked at t = 500, 1 and 0.
    """
    x_t, eps, z = inputs(5, (2, 4, 4, 3), (2, 4, 4, 3), (2, 4, 4, 3))
    betas, ab = jnp.asarray(LINEAR.betas), jnp.asarray(LINEAR.alphas_cumprod)

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
        return ddpm_step(LINEAR, e, t, t - 1, x, z).x_prev

    # sdjax (like diffusers) forms β_t as 1 − ᾱ_t/ᾱ_{t−1}, which in float32 keeps only ~4 digits at
    # t = 1 (β_1 ≈ 1.2e-4); the exercise's β_t comes straight from betas. Hence atol 1e-5: every
    # mistake above is off by more than 1e-3.
    ok = True
    for t in (500, 1, 0):
        ok &= check(f"ddpm_step at t={t}", fn, reference, (x_t, eps, t, betas, ab, z), mistakes, rtol=1e-4, atol=1e-5)
    return ok
