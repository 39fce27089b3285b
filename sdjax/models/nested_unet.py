"""The NestedUNet of Matryoshka Diffusion (Gu et al. 2023, arXiv:2310.15111): one network that denoises an image at
several resolutions at once, the low-resolution UNet sitting *inside* the high-resolution one.

A UNet already works at a ladder of resolutions: its encoder halves the grid level by level and its decoder doubles
it back. MDM gives every rung of that ladder an image of its own. With R resolutions r_0 < r_1 < … (here 16, 32,
64 px), the noisy images x_t^(r) of one picture enter at their own level and every level predicts its own output:

    x⁶⁴ ─ conv_in ─ ResnetBlocks ─┬─ stride-2 conv ─┐                                   ┌─ ↑ ─ ResnetBlocks ─ head ─ ε̂⁶⁴
                        (skips) └─────────────────│───────────────────────────────────│──────┘
    x³² ─ conv_in ─ (+) ─ ResnetBlocks ─┬─ stride-2 conv ─┐                 ┌─ ↑ ─ ResnetBlocks ─ head ─ ε̂³²
                          (skips) └───────────────│─────────────────│──────┘
    x¹⁶ ─ conv_in ─ (+) ─ the core: a whole text-conditioned UNet2D (encoder, middle, decoder) ─ head ─ ε̂¹⁶
                                                   c = CLIP(prompt) ─┘

Each outer level is a :class:`Shell`: its own input convolution, ResnetBlocks (the encoder side, whose outputs are
skip connections), a stride-2 convolution that hands its features to the level inside — *added* to what that level
made of its own, smaller image —, and on the way back an upsampling of the inner level's last features, ResnetBlocks
that read the skips, and an output head. The innermost level, the *core*, is an ordinary :class:`UNet2D` (the one
notebook 04 trains), so the attention to the prompt lives at the lowest resolution, where it is cheap, and the outer
levels are convolutions only. All levels share the core's time embedding (one noise level t for all resolutions).

The nesting is what makes progressive training possible: the core alone is a complete 16-px text-to-image model;
a shell around it makes a 16 + 32 px model whose inner part *is* the core (the same parameter arrays, not a copy); a
second shell makes the 64-px model. The convolution through which a shell hands features inwards starts at zero,
so a freshly grown model predicts at its inner resolutions exactly what the smaller model did.

Call it with the images lowest resolution first; how many you give decides how many levels run (1: the core alone):

    outs = nested([x16, x32, x64], t, context)    # [ε̂16, ε̂32, ε̂64], each the shape of its input
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.unet import DownBlock, UNet2D, UpBlock
from sdjax.models.unet_config import UNetConfig
from sdjax.nn import Upsample, conv, group_norm

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class NestedUNetConfig:
    """Shape of a :class:`NestedUNet`.

    core: the innermost UNet (lowest resolution, ``core.sample_size`` px), text-conditioned or not.
    shell_channels: the width of each outer level, innermost first; level k (k = 1 …) works at
        core.sample_size · 2^k px, so (32, 16) around a 16-px core gives 16, 32 and 64 px.
    layers_per_block: ResnetBlocks on each side of a shell.
    norm_num_groups, norm_eps: the shells' GroupNorms.
    """

    core: UNetConfig
    shell_channels: tuple[int, ...] = (32, 16)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    norm_eps: float = 1e-5

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The side of every level's image, lowest first: (16, 32, 64)."""
        return tuple(self.core.sample_size * 2**k for k in range(len(self.shell_channels) + 1))


class Shell(nnx.Module):
    """One outer level of a NestedUNet, at twice the resolution of the level inside it.

    :meth:`encode`: x (B, H, W, C_img) [+ ``cond`` (B, H, W, c) from the level outside] → skips, and the features
    (B, H/2, W/2, c_inner) handed inwards (a stride-2 conv, zero at initialisation). :meth:`decode`: the inner
    level's last features (B, H/2, W/2, c_inner) → upsampled ×2, ResnetBlocks reading the skips → (B, H, W, c).
    :meth:`output`: the head, GroupNorm, SiLU, conv → (B, H, W, C_img).
    """

    def __init__(self, c: int, c_inner: int, image_channels: int, *, temb_dim: int, layers: int, groups: int,
                 eps: float, rngs: nnx.Rngs):  # fmt: skip
        self.conv_in = conv(image_channels, c, 3, rngs)
        self.down = DownBlock(c, c, temb_dim=temb_dim, layers=layers, attention=None, downsample=False, groups=groups,
                              eps=eps, rngs=rngs)  # fmt: skip
        self.to_inner = conv(c, c_inner, 3, rngs, stride=2)
        self.to_inner.kernel[...] = jnp.zeros_like(self.to_inner.kernel[...])
        self.to_inner.bias[...] = jnp.zeros_like(self.to_inner.bias[...])
        self.upsample = Upsample(c_inner, rngs=rngs)
        self.up = UpBlock(c_inner, c, skip_channels=(c,) * (layers + 1), temb_dim=temb_dim, attention=None,
                          upsample=False, groups=groups, eps=eps, rngs=rngs)  # fmt: skip
        self.conv_norm_out = group_norm(c, groups, eps, rngs)
        self.conv_out = conv(c, image_channels, 3, rngs)

    def encode(self, x: Array, temb: Array, cond: Array | None) -> tuple[list[Array], Array]:
        h = self.conv_in(x)
        if cond is not None:
            h = h + cond
        out, pushed = self.down(h, temb)
        return [h, *pushed], self.to_inner(out)

    def decode(self, f: Array, skips: list[Array], temb: Array) -> Array:
        return self.up(self.upsample(f), list(skips), temb)

    def output(self, h: Array) -> Array:
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class NestedUNet(nnx.Module):
    """f_θ(x_t^(r_0), …, x_t^(r_{R−1}), t[, c]) → one output (ε, v or x̂_0) per resolution (module docstring).

    ``core`` is a :class:`UNet2D`; ``shells[k]`` the level at core.sample_size · 2^(k+1) px. Call with ``xs``, a
    list of 1 … R images lowest resolution first, each (B, r_k, r_k, C) (any r_0 divisible by the core's
    2^(levels−1); r_k = 2^k r_0); t (B,) or a scalar; context (B, S, D_c) for a text-conditioned core. Returns the
    list of outputs, each the shape of its input. The first len(xs) − 1 shells run; the others are not touched.
    """

    def __init__(self, config: NestedUNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.core = UNet2D(config.core, rngs=rngs)
        inner = (config.core.block_out_channels[0], *config.shell_channels)
        self.shells = nnx.List([
            Shell(c, c_in, config.core.in_channels, temb_dim=config.core.time_embed_dim,
                  layers=config.layers_per_block, groups=config.norm_num_groups, eps=config.norm_eps, rngs=rngs)
            for c, c_in in zip(config.shell_channels, inner)
        ])  # fmt: skip

    def __call__(self, xs: Sequence[Array], t: Array | float, context: Array | None = None) -> list[Array]:
        xs = list(xs)
        levels = len(self.shells) + 1
        if not 1 <= len(xs) <= levels:
            raise ValueError(f"NestedUNet: give 1 to {levels} images, lowest resolution first; got {len(xs)}")
        for k, x in enumerate(xs[1:], 1):
            if x.shape[:1] != xs[0].shape[:1] or x.shape[1:3] != (2**k * xs[0].shape[1], 2**k * xs[0].shape[2]):
                raise ValueError(
                    f"NestedUNet: image {k} must be 2^{k} times the first's size, same batch; got shapes "
                    f"{[tuple(a.shape) for a in xs]}"
                )
        shells = list(self.shells)[: len(xs) - 1]
        temb = self.core.embed_time(xs[0], t, context, None)  # one noise level, one embedding for every level
        cond, saved = None, []
        for shell, x in reversed(list(zip(shells, xs[1:]))):  # outermost first, down towards the core
            skips, cond = shell.encode(x, temb, cond)
            saved.append(skips)
        h, skips = self.core.encode(xs[0], temb, context, cond)
        f = self.core.decode(h, skips, temb, context)
        outs = [self.core.output(f)]
        for shell, skips in zip(shells, reversed(saved)):  # back out, innermost shell first
            f = shell.decode(f, skips, temb)
            outs.append(shell.output(f))
        return outs
