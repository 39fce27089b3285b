"""What the notebooks plot: image grids, loss curves and pictures of a latent space.

Images come in as sdjax keeps them — (N, H, W, C) floats in [−1, 1], C = 1 or 3 — and every
function returns the matplotlib Axes (or a uint8 array) so a notebook can add to it.
"""

from __future__ import annotations

import os

import numpy as np


def to_uint8(images) -> np.ndarray:
    """(N, H, W, C) in [−1, 1] → (N, H, W, 3) uint8 in [0, 255] (grey images repeated to RGB)."""
    x = np.asarray(images, dtype=np.float32)
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def make_grid(images, nrow: int = 8, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """Tile (N, H, W, C) images into one (rows·(H+pad)+pad, nrow·(W+pad)+pad, 3) uint8 array."""
    x = to_uint8(images)
    n, h, w, _ = x.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x[i]
    return grid


def show_grid(images, nrow: int = 8, title: str | None = None, ax=None, scale: float = 1.0):
    """Show images as a grid; returns the Axes."""
    import matplotlib.pyplot as plt

    grid = make_grid(images, nrow)
    if ax is None:
        _, ax = plt.subplots(figsize=(scale * grid.shape[1] / 40 + 1, scale * grid.shape[0] / 40 + 0.5))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def show_rows(rows, scale: float = 1.0):
    """One labelled row per entry of ``{"input": x, "reconstruction": x_hat}`` (or a list of
    ``(label, images)`` pairs, when labels repeat); returns the Figure."""
    import matplotlib.pyplot as plt

    pairs = rows.items() if isinstance(rows, dict) else rows
    grids = [(name, make_grid(imgs, nrow=len(imgs))) for name, imgs in pairs]
    width = max(g.shape[1] for _, g in grids)
    height = sum(g.shape[0] for _, g in grids)
    fig, axes = plt.subplots(
        len(grids), 1, figsize=(scale * width / 40 + 1.5, scale * height / 40 + 0.5), squeeze=False
    )
    for ax, (name, grid) in zip(axes[:, 0], grids):
        ax.imshow(grid, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def show_captioned(images, captions, ncol: int = 4, width: int = 30, scale: float = 1.0):
    """Images in a grid, each titled with its caption wrapped to ``width`` characters; returns the Figure.

    For captioned datasets and prompts: ``show_captioned(ds.images[:8], ds.captions[:8])``.
    """
    import textwrap

    import matplotlib.pyplot as plt

    x = to_uint8(images)
    n = len(x)
    ncol = min(ncol, n)
    nrows = -(-n // ncol)
    lines = [textwrap.wrap(str(c), width) or [""] for c in captions]
    title_h = 0.16 * max(len(wrapped) for wrapped in lines)
    fig, axes = plt.subplots(nrows, ncol, figsize=(scale * 2.2 * ncol, scale * (2.0 + title_h) * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, image, wrapped in zip(axes.ravel(), x, lines):
        ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(wrapped), fontsize=8)
    fig.tight_layout()
    return fig


def save_grid(path: str | os.PathLike, images, nrow: int = 8) -> None:
    """Write a grid of images to a PNG file."""
    from PIL import Image

    Image.fromarray(make_grid(images, nrow)).save(path)


def plot_history(history: dict[str, list], keys=("loss",), ax=None, log: bool = True, smooth: int = 1):
    """Loss curves from :func:`sdjax.train.fit`'s history. ``smooth`` = moving-average window."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.asarray(history["step"])
    for key in keys:
        y = np.asarray(history[key], dtype=np.float64)
        if smooth > 1 and len(y) >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            ax.plot(steps[smooth - 1 :], y, label=key)
        else:
            ax.plot(steps, y, label=key)
    ax.set_xlabel("step")
    if log:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def pca_2d(points) -> np.ndarray:
    """Project (N, ...) points on their two principal components: (N, 2).

    Centre X, take its SVD X = U S Vᵀ; the first two columns of U·S are the coordinates along the
    directions of largest variance.
    """
    x = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :2] * s[:2]


def latent_scatter(latents, labels, label_names=None, ax=None, title: str | None = None, colors=None):
    """Scatter latents in 2-D (PCA when they have more dims), coloured by an integer label.

    ``colors`` optionally maps each label value to a matplotlib colour (e.g. the RGB of a colour
    name); by default the tab10/tab20 palette is used.
    """
    import matplotlib.pyplot as plt

    z = np.asarray(latents, dtype=np.float64).reshape(len(latents), -1)
    xy = z if z.shape[1] == 2 else pca_2d(z)
    labels = np.asarray(labels)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
    for lab in np.unique(labels):
        sel = labels == lab
        name = label_names[lab] if label_names is not None else str(lab)
        color = colors[int(lab)] if colors is not None else cmap(int(lab) % cmap.N)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=color, label=name)
    ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_xlabel("z₁" if z.shape[1] == 2 else "PC 1")
    ax.set_ylabel("z₂" if z.shape[1] == 2 else "PC 2")
    if title:
        ax.set_title(title)
    return ax


def unet_diagram(config, ax=None):
    """Draw a conditional UNet's layout from its :class:`sdjax.models.unet.UNetConfig`: the levels with their grid
    size and channels, the skip connections, the mid block, where the timestep enters, and where the text context
    enters through cross-attention (keys and values from c, queries from the image). Returns the Axes.

    Drawn from the config, so the picture is the model's: ``unet_diagram(pipe.unet.config)``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    levels = len(config.block_out_channels)
    gap, width, left, right, mid = 1.7, 4.4, 0.0, 12.0, 6.0  # level spacing, box width, column positions
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 1.2 * levels + 3.2))
    ax.set_axis_off()
    cross = [t.startswith("CrossAttn") for t in config.down_block_types]
    attn = [("Attn" in t) for t in config.down_block_types]
    colour = {True: "#f6d7a7", False: "#c9dcf0"}  # levels with cross-attention, without

    def box(x, y, text, fc, w=width, h=1.0):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05", fc=fc, ec="0.3"))
        ax.text(x, y, text, ha="center", va="center", fontsize=8)

    def arrow(a, b, **kw):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, color=kw.pop("color", "0.3"), **kw))

    def label(level, up):
        size = config.sample_size // 2**level
        block = "Transformer2D (self-, cross-attn)" if cross[level] else "SelfAttention" if attn[level] else ""
        blocks = f"ResnetBlock ×{config.layers_per_block + up}" + (f" + {block}" if block else "")
        return f"{size}×{size}×{config.block_out_channels[level]}\n" + blocks.replace(" + ", "\n+ ", 1)

    top = gap * levels
    ys = [top - gap * (i + 1) for i in range(levels)]
    size0 = f"{config.sample_size}×{config.sample_size}"
    box(left, top, f"x_t  {size0}×{config.in_channels}", "white", w=2.6, h=0.6)
    box(right, top, f"output  {size0}×{config.out_channels}", "white", w=2.6, h=0.6)
    for i, y in enumerate(ys):
        box(left, y, label(i, up=False), colour[cross[i]])
        box(right, y, label(i, up=True), colour[cross[i]])
        arrow((left + width / 2, y), (right - width / 2, y), linestyle="--", color="0.55")  # the skip connection
        ax.text(mid, y + 0.12, "skip connection (concatenated)", ha="center", fontsize=7, color="0.45")
    arrow((left, top - 0.3), (left, ys[0] + 0.5))
    arrow((right, ys[0] + 0.5), (right, top - 0.3))
    for a, b in zip(ys, ys[1:]):
        arrow((left, a - 0.5), (left, b + 0.5))
        ax.text(left + 0.15, (a + b) / 2, "Downsample ÷2", fontsize=7, va="center")
        arrow((right, b + 0.5), (right, a - 0.5))
        ax.text(right + 0.15, (a + b) / 2, "Upsample ×2", fontsize=7, va="center")
    mid_y = ys[-1] - gap
    mid_cross = config.mid_block_type.endswith("CrossAttn")
    size = config.sample_size // 2 ** (levels - 1)
    middle = "Transformer2D" if mid_cross else "SelfAttention"
    box(mid, mid_y, f"mid block {size}×{size}×{config.block_out_channels[-1]}\nResnetBlock + {middle} + ResnetBlock",
        colour[mid_cross], w=width + 0.8)  # fmt: skip
    arrow((left, ys[-1] - 0.5), (mid - width / 2, mid_y))
    arrow((mid + width / 2, mid_y), (right, ys[-1] - 0.5))
    if config.cross_attention_dim:
        box(mid, top + 1.1, f"text encoder → context c (77 × {config.cross_attention_dim})\ncross-attention: Q from "
            "the image, K and V from c", colour[True], w=5.2, h=0.8)  # fmt: skip
        targets = [(left + width / 2, y) for y, c in zip(ys, cross) if c]
        targets += [(right - width / 2, y) for y, c in zip(ys, cross) if c]
        targets += [(mid, mid_y + 0.5)] if mid_cross else []
        for x, y in targets:
            arrow((mid, top + 0.7), (x, y + 0.3 * (x != mid)), color="#c98a2b", lw=0.8)
    ax.text(mid, mid_y - 0.9, "timestep t → sinusoidal features → MLP → added inside every ResnetBlock",
            ha="center", fontsize=8, color="0.35")  # fmt: skip
    ax.set_xlim(left - width / 2 - 0.3, right + width / 2 + 0.3)
    ax.set_ylim(mid_y - 1.2, top + 1.6)
    return ax
