"""The variational autoencoder (Kingma & Welling 2013, arXiv:1312.6114) — Stable Diffusion's ``AutoencoderKL``.

A VAE's encoder outputs a *distribution* over latents instead of one point: a diagonal Gaussian
q_φ(z|x) = N(μ_φ(x), diag σ²_φ(x)). Training maximises the evidence lower bound (ELBO)

    log p(x) ≥ E_{z∼q(z|x)}[log p_θ(x|z)] − KL(q_φ(z|x) ‖ p(z)),       p(z) = N(0, I)

i.e. minimises  reconstruction error + β · KL.  The KL term pulls every posterior towards the prior,
which makes the latent space smooth (nearby z decode to similar images) and lets us *sample* new
images by decoding z ∼ N(0, I). With β → 0 it becomes a plain autoencoder; with β large the
posteriors collapse to the prior and reconstructions blur.

Stable Diffusion's autoencoder is this model with a tiny KL weight (β ≈ 1e-6 against a
reconstruction term summed over the pixels of each image, L1 + LPIPS, plus an adversarial loss;
Rombach et al. 2022 §3): just enough KL to keep the latents well-scaled and smooth for the diffusion
model, not so much that detail is lost. ``VAEConfig.sd()``
is its exact architecture; the toy VAE of notebook 02 is the same code with a small config.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.autoencoder import AutoencoderConfig, Decoder, Encoder
from sdjax.nn import conv

Array = jax.Array

DEFAULT_TILE_OVERLAP = 0.25  # the fraction of a tile that overlaps its neighbour (diffusers' value)


@dataclasses.dataclass(frozen=True)
class VAEConfig(AutoencoderConfig):
    """An :class:`AutoencoderConfig` plus what SD's ``AutoencoderKL`` adds.

    scaling_factor: latents are multiplied by this before diffusion so they have roughly unit
        variance (SD1/2: 0.18215); ``decode`` expects unscaled latents.
    use_quant_conv: the 1×1 convolutions between encoder/decoder and the latent (SD has them).
    force_upcast: a float16 pipeline decodes with this VAE in float32 (diffusers' flag, True by default: SD's
        decoder overflows float16's 65,504 and gives black images otherwise). It does not change the network.
    """

    scaling_factor: float = 1.0
    use_quant_conv: bool = True
    force_upcast: bool = True

    @classmethod
    def from_diffusers(cls, config: dict) -> VAEConfig:
        """The config of a diffusers ``AutoencoderKL`` (its ``config.json``).

        Options sdjax does not implement must have their default values (ValueError naming them
        otherwise). ``sample_size`` does not change the network and is ignored.
        """
        must_be = {
            "act_fn": ("silu",),
            "shift_factor": (None, 0, 0.0),
            "latents_mean": (None,),
            "latents_std": (None,),
            "down_block_types": ("DownEncoderBlock2D",),
            "up_block_types": ("UpDecoderBlock2D",),
        }
        bad = [
            f"{k}={config[k]!r}"
            for k, allowed in must_be.items()
            if k in config
            and any(v not in allowed for v in (config[k] if isinstance(config[k], list | tuple) else [config[k]]))
        ]
        if config.get("use_quant_conv", True) != config.get("use_post_quant_conv", True):
            bad.append("use_quant_conv ≠ use_post_quant_conv")
        fields = {f.name for f in dataclasses.fields(cls)} - {"mid_block_attention"}
        known = set(must_be) | fields | {"sample_size", "use_post_quant_conv", "mid_block_add_attention"}
        bad += [f"{k} (unknown key)" for k in config if not k.startswith("_") and k not in known]
        if bad:
            raise ValueError(
                "this diffusers AutoencoderKL config uses options sdjax does not implement: " + ", ".join(bad)
            )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        return cls(mid_block_attention=config.get("mid_block_add_attention", True), **kwargs)

    def to_diffusers(self) -> dict:
        """The diffusers ``AutoencoderKL`` config.json of this architecture."""
        return {
            "_class_name": "AutoencoderKL",
            **self.diffusers_fields(),
            "scaling_factor": self.scaling_factor,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_quant_conv,
            "force_upcast": self.force_upcast,
        }

    @classmethod
    def sd(cls) -> VAEConfig:
        """Stable Diffusion 1.x / 2.x autoencoder: f = 8, c = 4, ~84M parameters."""
        return cls(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            mid_block_attention=True,
            scaling_factor=0.18215,
        )

    @classmethod
    def sdxl(cls) -> VAEConfig:
        """SDXL's autoencoder: SD's architecture, retrained, with its latents scaled by 0.13025."""
        return dataclasses.replace(cls.sd(), scaling_factor=0.13025)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DiagonalGaussian:
    """q(z|x) = N(μ, diag exp(log σ²)). Fields are (B, h, w, c) arrays."""

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> DiagonalGaussian:
        """Split the encoder's (B, h, w, 2c) output into μ and log σ² (clipped to [−30, 20] as SD does,
        so exp() can neither underflow to a zero σ nor overflow)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: Array) -> Array:
        """A reparameterised sample z = μ + σ ⊙ ε with ε ∼ N(0, I) (see :func:`reparameterize`)."""
        return reparameterize(self.mean, self.logvar, jax.random.normal(key, self.mean.shape, self.mean.dtype))

    def mode(self) -> Array:
        return self.mean

    def kl(self) -> Array:
        """KL(q ‖ N(0, I)) per example, summed over latent dims: (B,). See :func:`kl_divergence`."""
        return kl_divergence(self.mean, self.logvar)


def reparameterize(mean: Array, logvar: Array, eps: Array) -> Array:
    """The reparameterisation trick: z = μ + σ ⊙ ε,  σ = exp(½ log σ²),  ε ∼ N(0, I).

    Sampling z ∼ N(μ, σ²) directly has no gradient with respect to μ and σ. Writing the sample as a
    deterministic function of (μ, σ) and parameter-free noise ε moves the randomness out of the way,
    so ∂z/∂μ = 1 and ∂z/∂σ = ε and the encoder can be trained by backpropagation.
    """
    return mean + jnp.exp(0.5 * logvar) * eps


def kl_divergence(mean: Array, logvar: Array) -> Array:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over all but the batch axis: (B, ...) → (B,).

    For one dimension, KL = ½ (μ² + σ² − 1 − log σ²): zero exactly when μ = 0 and σ = 1.
    """
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


class AutoencoderKL(nnx.Module):
    """The VAE: encoder → (quant_conv) → q(z|x); z → (post_quant_conv) → decoder.

    Shapes: x (B, H, W, C) → posterior over z (B, H/f, W/f, c) → x̂ (B, H, W, C).
    """

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg, 2 * c, rngs=rngs)
        self.quant_conv = conv(2 * c, 2 * c, 1, rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(c, c, 1, rngs) if cfg.use_quant_conv else None
        self.decoder = Decoder(cfg, rngs=rngs)

    def moments(self, x: Array) -> Array:
        """(B, H, W, C) → the encoder's (B, H/f, W/f, 2c) output: μ and log σ² side by side, unclipped."""
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode(self, x: Array) -> DiagonalGaussian:
        """(B, H, W, C) → q(z|x) with (B, H/f, W/f, c) mean and log-variance."""
        return DiagonalGaussian.from_moments(self.moments(x))

    def decode(self, z: Array) -> Array:
        """(B, h, w, c) unscaled latents → (B, h·f, w·f, C) images."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: Array, key: Array | None = None) -> tuple[Array, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (or the posterior mean when ``key`` is None)."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior

    def tiled_encode(self, x: Array, *, tile: int, overlap: float = DEFAULT_TILE_OVERLAP) -> DiagonalGaussian:
        """:meth:`encode` in overlapping tile × tile pixel windows, blended (:func:`tiled`); ``tile`` a
        multiple of f. For SD, tile = 512 is diffusers' ``enable_tiling()``."""
        tile_out = tile // self.config.downsample_factor
        return DiagonalGaussian.from_moments(tiled(self.moments, x, tile=tile, tile_out=tile_out, overlap=overlap))

    def tiled_decode(self, z: Array, *, tile: int, overlap: float = DEFAULT_TILE_OVERLAP) -> Array:
        """:meth:`decode` in overlapping tile × tile latent windows, blended (:func:`tiled`). For SD,
        tile = 64 (512 pixels) is diffusers' ``enable_tiling()``."""
        return tiled(self.decode, z, tile=tile, tile_out=tile * self.config.downsample_factor, overlap=overlap)


# ---------------------------------------------------------------------------------------------------
# Tiling: encode or decode an image too large for memory in overlapping windows
# ---------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("extent", "axis"))
def blend(a: Array, b: Array, extent: int, axis: int) -> Array:
    """Fade the tile ``a`` into its successor ``b`` along ``axis`` over ``extent`` rows:

        b[y] ← (1 − y/e) · a[n_a − e + y] + (y/e) · b[y],    y = 0 … e − 1,   e = min(extent, n_a, n_b)

    so b starts with a's row n_a − e and the weight shifts linearly to b's own rows. (B, …) arrays. One
    compiled program per pair of window shapes (op by op, each of its dozen operations would compile its own).
    """
    e = min(extent, a.shape[axis], b.shape[axis])
    if e == 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = e
    w = (jnp.arange(e, dtype=jnp.float32) / e).astype(b.dtype).reshape(shape)
    tail_of_a = jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis)
    head = (1 - w) * tail_of_a + w * jax.lax.slice_in_dim(b, 0, e, axis=axis)
    return jnp.concatenate([head, jax.lax.slice_in_dim(b, e, b.shape[axis], axis=axis)], axis=axis)


def tiled(fn, x: Array, *, tile: int, tile_out: int, overlap: float = DEFAULT_TILE_OVERLAP) -> Array:
    """Apply a convolutional ``fn`` (B, H, W, C) → (B, H·s, W·s, C') to a large x one window at a time.

    Windows of tile × tile start every ``stride = ⌊tile (1 − overlap)⌋`` rows and columns (the last
    ones are cut short by the border). Each output window (tile_out = tile · s on a side) is blended
    into the window above it and the one to its left over ``e = ⌊tile_out · overlap⌋`` rows
    (:func:`blend`, in raster order, so a window fades into already-blended neighbours), then cropped
    to its first ``tile_out − e`` rows and columns, which is exactly stride · s: the crops tile the
    output. An x no larger than one window is passed to ``fn`` whole.

    Memory: ``fn`` sees one window at a time, so its activations are those of a tile whatever the
    image size; only the outputs of one row of windows and the result are kept. Called outside
    ``jax.jit`` with a jitted ``fn`` (the pipeline does so), each window shape compiles once: full, or
    cut short by the bottom or right border (four shapes when the size is a multiple of the stride).

    The result is not ``fn(x)``: every window normalises with its own GroupNorm statistics and attends
    only within itself, and the blending hides the seams that makes. This is diffusers'
    ``AutoencoderKL`` tiling (same windows, blending and crops; tested equal to it).
    """
    height, width = x.shape[1:3]
    if height <= tile and width <= tile:
        return fn(x)
    stride, extent = int(tile * (1 - overlap)), int(tile_out * overlap)
    if stride < 1 or tile_out - extent != stride * tile_out // tile:
        raise ValueError(
            f"tile={tile}, tile_out={tile_out}, overlap={overlap}: the cropped output windows "
            f"({tile_out - extent}) must equal the stride ({stride}) scaled by {tile_out}/{tile}; use an overlap "
            "that makes tile·overlap and tile_out·overlap whole numbers, e.g. 0.25 with a tile divisible by 4"
        )
    above: list[Array] = []
    rows = []
    for i in range(0, height, stride):
        row: list[Array] = []
        for k, j in enumerate(range(0, width, stride)):
            out = fn(x[:, i : i + tile, j : j + tile])
            if above:
                out = blend(above[k], out, extent, axis=1)
            if row:
                out = blend(row[-1], out, extent, axis=2)
            row.append(out)
        rows.append(jnp.concatenate([out[:, : tile_out - extent, : tile_out - extent] for out in row], axis=2))
        above = row
    return jnp.concatenate(rows, axis=1)


def vae_loss(model: AutoencoderKL, batch: dict, key: Array, *, kl_weight: float = 1e-3) -> tuple[Array, dict]:
    """The negative ELBO with a KL weight β, averaged over the batch:

        L = E_x[ Σ_pixels (x − x̂)²  +  β · KL(q(z|x) ‖ N(0, I)) ],    x̂ = D(z), z ∼ q(z|x)

    The squared error summed over pixels is −log p(x|z) (up to a constant) for a Gaussian decoder of
    variance ½, so β = 1 is the true ELBO of that model; β < 1 trades sample quality for sharper
    reconstructions (β-VAE, Higgins et al. 2017). Use ``functools.partial(vae_loss, kl_weight=β)``
    with :func:`sdjax.train.fit`.
    """
    x = batch["image"]
    x_hat, posterior = model(x, key)
    recon = jnp.sum(jnp.square(x - x_hat), axis=tuple(range(1, x.ndim)))
    kl = posterior.kl()
    loss = jnp.mean(recon + kl_weight * kl)
    return loss, {"recon": jnp.mean(recon), "kl": jnp.mean(kl), "mse": jnp.mean(jnp.square(x - x_hat))}
