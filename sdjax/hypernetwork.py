"""AUTOMATIC1111 hypernetworks: small residual MLPs that rewrite an attention layer's context before K and V.

A web-UI hypernetwork (not Ha et al.'s weight-generating networks) holds, for each context width d it knows,
two MLPs f_k, f_v: ℝ^d → ℝ^d. Every attention layer of the UNet whose context is d wide computes

    K = (c + s · f_k(c)) W_k,     V = (c + s · f_v(c)) W_v,     Q = x W_q (unchanged),

with s the strength (the web UI's multiplier; 1 while training). The context c is the text encoding in a
cross-attention and the layer's own input x in a self-attention: the web UI applies a width-d module wherever
an attention's context is d wide, so a file made with its default modules (768, 320, 640, 1280) rewrites SD1's
cross-attention *and* the self-attention of every UNet level. f runs in float32, whatever the UNet's dtype.

f follows ``layer_structure`` = (1, m₁, …, m_{n−1}, 1): widths d_i = int(d · m_i), and for i = 0 … n−1 in order

    Linear(d_i → d_{i+1})
    activation            unless "linear"/None; after the last Linear only with ``activate_output``
    LayerNorm(d_{i+1})    if ``is_layer_norm`` (ε = 1e-5, learned gain and bias)
    Dropout(p_{i+1})      if ``dropout_structure[i+1]`` > 0 (training only)

as one ``torch.nn.Sequential`` named ``linear``: a parameter's name is ``linear.<position>.weight``/``.bias``, the
position counting every entry (activations and dropouts too), e.g. (1, 2, 1) with relu and layer norm gives
Linear 0, ReLU 1, LayerNorm 2, Linear 3, LayerNorm 4. Activations are torch's: "swish" is *hard* swish
x · relu6(x + 3) / 6, "leakyrelu" has slope 0.01, "gelu" the erf form; see :data:`ACTIVATIONS`.

The ``.pt`` file (``torch.save`` of a dict; :func:`load_hypernetwork`, :func:`save_hypernetwork`)::

    {768: (state_dict_k, state_dict_v), 320: (...), ...,      int keys: the context widths
     "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
     "weight_initialization": "Normal", "use_dropout": False, "dropout_structure": [0, 0, 0],
     "last_layer_dropout": False, "activate_output": False,
     "name": ..., "step": ..., "sd_checkpoint": ..., "sd_checkpoint_name": ..., "optional_info": ...}

A missing option reads as the web UI reads it: layer_structure (1, 2, 1), no activation, no layer norm,
activate_output True, last_layer_dropout False; without ``dropout_structure``, ``use_dropout`` gives
p = (0, 0.3, …, 0.3, 0.3 if last_layer_dropout else 0, 0). The first files named their two Linears
``linear1``/``linear2``, read as ``linear.0``/``linear.1``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sdjax.nn import Attention, SelfAttention

Array = jax.Array

# torch.nn's activations by the web UI's names (its dict: torch.nn.modules.activation's classes, lower-cased,
# "linear" = none and "swish" = Hardswish). Parameter-free but PReLU (one learned slope a, file key ``weight``).
RRELU_SLOPE = (1 / 8 + 1 / 3) / 2  # RReLU draws its slope from U(1/8, 1/3) in training; evaluation uses the mean


def _softplus(x: Array) -> Array:
    return jnp.where(x > 20, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20))))  # torch: x itself above threshold 20


def _hardswish(x: Array) -> Array:
    return x * jnp.clip(x + 3, 0, 6) / 6


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "leakyrelu": lambda x: jnp.where(x > 0, x, 0.01 * x),
    "elu": lambda x: jnp.where(x > 0, x, jnp.expm1(jnp.minimum(x, 0))),
    "celu": lambda x: jnp.where(x > 0, x, jnp.expm1(jnp.minimum(x, 0))),  # α = 1: ELU
    "selu": jax.nn.selu,
    "swish": _hardswish,
    "hardswish": _hardswish,
    "silu": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(_softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "hardsigmoid": lambda x: jnp.clip(x + 3, 0, 6) / 6,
    "hardtanh": lambda x: jnp.clip(x, -1, 1),
    "relu6": lambda x: jnp.clip(x, 0, 6),
    "rrelu": lambda x: jnp.where(x >= 0, x, RRELU_SLOPE * x),
    "logsigmoid": jax.nn.log_sigmoid,
    "softplus": _softplus,
    "softsign": lambda x: x / (1 + jnp.abs(x)),
    "tanhshrink": lambda x: x - jnp.tanh(x),
    "softshrink": lambda x: jnp.where(x > 0.5, x - 0.5, jnp.where(x < -0.5, x + 0.5, 0.0)),
    "hardshrink": lambda x: jnp.where(jnp.abs(x) > 0.5, x, 0.0),
    "prelu": None,  # a · x for x < 0, a learned (1,)
}
NO_ACTIVATION = (None, "linear")
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def default_dropout_structure(layer_structure, use_dropout: bool, last_layer_dropout: bool) -> tuple[float, ...]:
    """The web UI's dropout probabilities for a file without ``dropout_structure``: none without ``use_dropout``,
    else 0.3 after every hidden Linear but the last, which gets 0.3 only with ``last_layer_dropout``."""
    n = len(layer_structure)
    if not use_dropout:
        return (0.0,) * n
    return (0.0, *([0.3] * (n - 3)), 0.3 if last_layer_dropout else 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class HypernetworkConfig:
    """The shape of every MLP of a hypernetwork (the file's option fields; see the module docstring).

    ``dropout_structure``: p per entry of ``layer_structure`` (p₀ unused); None derives it from ``use_dropout``
    and ``last_layer_dropout`` (:func:`default_dropout_structure`). ``weight_initialization`` is only used by
    :meth:`Hypernetwork.create`: "Normal" draws W ~ N(0, 0.01²) (and a LayerNorm's gain too, as the web UI
    does), the others Xavier/Kaiming (gain √2) weights; biases start at 0.
    """

    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation_func: str | None = "linear"
    is_layer_norm: bool = False
    activate_output: bool = False
    use_dropout: bool = False
    last_layer_dropout: bool = False
    dropout_structure: tuple[float, ...] | None = None
    weight_initialization: str = "Normal"

    def __post_init__(self):
        ls = tuple(self.layer_structure)
        object.__setattr__(self, "layer_structure", ls)
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or any(m <= 0 for m in ls):
            raise ValueError(f"layer_structure {list(ls)}: expected positive multipliers starting and ending with 1")
        if self.activation_func not in NO_ACTIVATION and self.activation_func not in ACTIVATIONS:
            raise ValueError(
                f"hypernetwork activation {self.activation_func!r} is not supported: expected 'linear' or one of "
                f"{sorted(ACTIVATIONS)}"
            )
        if self.dropout_structure is None:
            drop = default_dropout_structure(ls, self.use_dropout, self.last_layer_dropout)
        else:  # given: the flags follow it, as the web UI writes them
            drop = tuple(float(p) for p in self.dropout_structure)
            object.__setattr__(self, "use_dropout", self.use_dropout or any(drop))
            object.__setattr__(self, "last_layer_dropout", len(drop) > 1 and drop[-2] != 0)
        if len(drop) != len(ls) or not all(0 <= p < 1 for p in drop):
            raise ValueError(
                f"dropout_structure {list(drop)}: expected {len(ls)} probabilities in [0, 1), one per layer_structure "
                "entry"
            )
        object.__setattr__(self, "dropout_structure", drop)
        if self.weight_initialization not in WEIGHT_INITS:
            raise ValueError(f"weight_initialization {self.weight_initialization!r}: expected one of {WEIGHT_INITS}")


class HypernetworkParam(nnx.Param):
    """A hypernetwork weight: what :func:`train_hypernetwork` trains while the UNet stays frozen."""


class HypernetworkStrength(nnx.Variable):
    """The strength s: array state, so a new strength never recompiles a jitted model; never trained."""


class Dense(nnx.Module):
    """torch's Linear in its own layout: y = x Wᵀ + b, W (out, in) as the file stores it."""

    def __init__(self, d_in: int, d_out: int):
        self.weight = HypernetworkParam(jnp.zeros((d_out, d_in), jnp.float32))
        self.bias = HypernetworkParam(jnp.zeros((d_out,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        return x @ self.weight[...].T + self.bias[...]


class LayerNorm(nnx.Module):
    """torch's LayerNorm over the last axis: (x − μ) / √(σ² + 1e-5) · weight + bias, σ² the biased variance."""

    def __init__(self, dim: int):
        self.weight = HypernetworkParam(jnp.ones((dim,), jnp.float32))
        self.bias = HypernetworkParam(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + 1e-5) * self.weight[...] + self.bias[...]


class Activation(nnx.Module):
    """One of :data:`ACTIVATIONS` by name; PReLU holds its slope a (1,) as ``weight`` (0.25 to start, as torch)."""

    def __init__(self, name: str):
        self.name = name
        self.weight = HypernetworkParam(jnp.full((1,), 0.25, jnp.float32)) if name == "prelu" else None

    def __call__(self, x: Array) -> Array:
        if self.name == "prelu":
            return jnp.where(x >= 0, x, self.weight[...] * x)
        return ACTIVATIONS[self.name](x)


class HypernetworkMLP(nnx.Module):
    """One f: ℝ^d → ℝ^d of the web UI's ``HypernetworkModule``, its entries in ``linear`` at the file's positions.

    Returns f(x) alone; the residual and the strength are :class:`Hypernetwork`'s. Shapes: (..., d) → (..., d).
    """

    def __init__(self, dim: int, config: HypernetworkConfig, *, rngs: nnx.Rngs):
        ls, n = config.layer_structure, len(config.layer_structure)
        layers: list[nnx.Module] = []
        for i in range(n - 1):
            d_out = int(dim * ls[i + 1])
            layers.append(Dense(int(dim * ls[i]), d_out))
            if config.activation_func not in NO_ACTIVATION and (i < n - 2 or config.activate_output):
                layers.append(Activation(config.activation_func))
            if config.is_layer_norm:
                layers.append(LayerNorm(d_out))
            if config.dropout_structure[i + 1] > 0:
                layers.append(nnx.Dropout(config.dropout_structure[i + 1], deterministic=True, rngs=rngs))
        self.linear = nnx.List(layers)

    def __call__(self, x: Array) -> Array:
        for layer in self.linear:
            x = layer(x)
        return x

    def state_dict(self) -> dict[str, np.ndarray]:
        """{``linear.<position>.weight``/``.bias``: array in torch's layout}, as the file names them."""
        out = {}
        for i, layer in enumerate(self.linear):
            for name in ("weight", "bias"):
                if getattr(layer, name, None) is not None:
                    out[f"linear.{i}.{name}"] = np.asarray(getattr(layer, name)[...])
        return out


class Hypernetwork(nnx.Module):
    """For each context width d in ``widths``, the pair (f_k, f_v), and the strength s:

        hypernetwork(c) = (c + s · f_k(c), c + s · f_v(c))    for c (..., d), d in widths; else (c, c).

    In training mode (``.train()``) s counts as 1 and dropout acts, as in the web UI. Attach it to a UNet with
    :func:`attach_hypernetwork` (or load one with :func:`load_hypernetwork`); ``name``, ``step``,
    ``sd_checkpoint``, ``sd_checkpoint_name`` and ``optional_info`` are the file's bookkeeping fields.
    """

    def __init__(self, widths, config: HypernetworkConfig, *, strength: float = 1.0, name: str | None = None,
                 rngs: nnx.Rngs):  # fmt: skip
        self.config, self.widths = config, tuple(int(w) for w in widths)
        if not self.widths or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"hypernetwork widths {list(self.widths)}: expected distinct context widths")
        self.mlps = nnx.List(
            [nnx.List([HypernetworkMLP(w, config, rngs=rngs), HypernetworkMLP(w, config, rngs=rngs)]) for w in widths]
        )
        self.strength = HypernetworkStrength(jnp.float32(strength))
        self.deterministic = True  # False in training mode: s = 1 (nnx's .train() / .eval() set it)
        self.name, self.step, self.optional_info = name, 0, None
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None

    @classmethod
    def create(cls, widths, config: HypernetworkConfig = HypernetworkConfig(), *, seed: int = 0,
               name: str | None = None) -> Hypernetwork:  # fmt: skip
        """A new hypernetwork to train, its weights drawn by ``config.weight_initialization`` (biases 0)."""
        net = cls(widths, config, name=name, rngs=nnx.Rngs(dropout=seed))
        rng = np.random.default_rng(seed)
        for _, layer in nnx.iter_modules(net):
            if isinstance(layer, LayerNorm):
                layer.weight[...] = jnp.asarray(rng.normal(0.0, 0.01, layer.weight.shape), jnp.float32)
            elif isinstance(layer, Dense):
                layer.weight[...] = jnp.asarray(_initial_weight(rng, layer.weight.shape, config), jnp.float32)
        return net

    def set_strength(self, strength: float) -> None:
        self.strength[...] = jnp.float32(strength)

    def __call__(self, context: Array) -> tuple[Array, Array]:
        """(c_k, c_v) for the keys and values: (B, S, d) → two (B, S, d), in the context's dtype."""
        width = context.shape[-1]
        if width not in self.widths:
            return context, context
        f_k, f_v = self.mlps[self.widths.index(width)]
        s = 1.0 if not self.deterministic else self.strength[...]
        c = context.astype(jnp.float32)
        return tuple((c + f(c) * s).astype(context.dtype) for f in (f_k, f_v))


def _initial_weight(rng: np.random.Generator, shape, config: HypernetworkConfig) -> np.ndarray:
    """A new Linear's W (out, in) by the web UI's options (torch's formulas; Kaiming with gain √2)."""
    d_out, d_in = shape
    init = config.weight_initialization
    if init == "Normal":
        return rng.normal(0.0, 0.01, shape)
    if init == "XavierUniform":
        bound = np.sqrt(6.0 / (d_in + d_out))
        return rng.uniform(-bound, bound, shape)
    if init == "XavierNormal":
        return rng.normal(0.0, np.sqrt(2.0 / (d_in + d_out)), shape)
    if init == "KaimingUniform":
        bound = np.sqrt(2.0) * np.sqrt(3.0 / d_in)
        return rng.uniform(-bound, bound, shape)
    return rng.normal(0.0, np.sqrt(2.0) / np.sqrt(d_in), shape)  # KaimingNormal


# ---------------------------------------------------------------------------------------------------
# Attaching to a UNet
# ---------------------------------------------------------------------------------------------------


def _attention_layers(model: nnx.Module) -> list[Attention]:
    """The attention layers a hypernetwork can rewrite: the transformer blocks' self- and cross-attention
    (not :class:`SelfAttention`, the VAE-style spatial block, which the web UI leaves alone)."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Attention) and not isinstance(m, SelfAttention)]


def _context_width(layer: Attention) -> int:
    return int(layer.to_k.kernel.shape[-2])  # to_k: (d_context, inner) — an nnx.Linear or a LoRA layer


def attach_hypernetwork(hypernetwork: Hypernetwork, model: nnx.Module) -> int:
    """Put ``hypernetwork`` into every attention layer of ``model`` (a UNet) whose context width it has.
    Returns how many layers it rewrites; a ValueError when none matches or a hypernetwork is there already."""
    layers = _attention_layers(model)
    widths = sorted({_context_width(layer) for layer in layers})
    matched = [layer for layer in layers if _context_width(layer) in hypernetwork.widths]
    if not matched:
        raise ValueError(
            f"the hypernetwork's context widths {sorted(hypernetwork.widths)} match no attention layer of this model "
            f"(its attention contexts are {widths} wide): it was made for another model family (768: SD1, 1024: SD2)"
        )
    if any(layer.hypernetwork is not None for layer in matched):
        raise ValueError("this model has a hypernetwork already: remove_hypernetwork(model) first")
    for layer in matched:
        layer.hypernetwork = hypernetwork
    return len(matched)


def remove_hypernetwork(model: nnx.Module) -> int:
    """Take every hypernetwork out of ``model``'s attention layers (the base model back). Returns how many."""
    layers = [layer for layer in _attention_layers(model) if layer.hypernetwork is not None]
    for layer in layers:
        layer.hypernetwork = None
    return len(layers)


def find_hypernetwork(model: nnx.Module) -> Hypernetwork | None:
    """The hypernetwork attached to ``model``, or None."""
    return next((layer.hypernetwork for layer in _attention_layers(model) if layer.hypernetwork is not None), None)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

OLD_NAMES = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}  # fmt: skip


def read_hypernetwork(path: str | os.PathLike, strength: float = 1.0) -> Hypernetwork:
    """A web-UI hypernetwork ``.pt`` file as a :class:`Hypernetwork` (not attached to anything).

    Read with ``torch.load(weights_only=True)``: a file whose pickle names code is refused, never run.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such hypernetwork file: {path}")
    if path.suffix.lower() == ".safetensors":
        raise ValueError(
            f"{path}: the web UI's hypernetworks are .pt files (torch.save of a dict keyed by context width); there "
            "is no standard .safetensors layout for them. Give the .pt file."
        )
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it may not support: the error says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # a broken pickle rather than a forbidden object
            raise ValueError(f"{path} is not a readable torch .pt file ({str(e).splitlines()[-1][:200]})") from None
        raise ValueError(
            f"{path}: the file holds code (its pickle names a Python object beyond tensors and plain values) and "
            f"will not be loaded; a hypernetwork file holds only tensors and options"
        ) from None
    except Exception as e:  # not a torch file at all
        raise ValueError(f"{path} is not a torch .pt file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a hypernetwork dict, found a {type(data).__name__}")
    widths = [k for k in data if isinstance(k, int)]
    if not widths:
        raise ValueError(
            f"{path} holds no hypernetwork modules (integer context-width keys such as 768); keys: "
            f"{sorted(map(str, data))[:12]}. Is it a textual-inversion embedding or a LoRA?"
        )
    dropout = data.get("dropout_structure")
    use_dropout = bool(dropout is not None and any(dropout)) or bool(data.get("use_dropout", False))
    config = HypernetworkConfig(
        layer_structure=tuple(data.get("layer_structure") or (1, 2, 1)),
        activation_func=data.get("activation_func"),
        is_layer_norm=bool(data.get("is_layer_norm", False)),
        activate_output=bool(data.get("activate_output", True)),
        use_dropout=use_dropout,
        last_layer_dropout=bool(data.get("last_layer_dropout", False)),
        dropout_structure=None if dropout is None else tuple(dropout),
        weight_initialization=data.get("weight_initialization") or "Normal",
    )
    net = Hypernetwork(widths, config, strength=strength, name=data.get("name") or path.stem, rngs=nnx.Rngs(0))
    for width, pair in zip(widths, net.mlps):
        modules = data[width]
        if not isinstance(modules, (list, tuple)) or len(modules) != 2:
            raise ValueError(f"{path}: entry {width} must be a pair of state dicts (k, v), found {type(modules)}")
        for which, mlp, state in zip("kv", pair, modules):
            _load_mlp(mlp, {OLD_NAMES.get(k, k): v for k, v in state.items()}, f"{path} [{width}][{which}]")
    net.step = int(data.get("step") or 0)
    text = lambda key: None if data.get(key) is None else str(data[key])  # noqa: E731
    net.sd_checkpoint, net.sd_checkpoint_name = text("sd_checkpoint"), text("sd_checkpoint_name")
    info = data.get("optional_info")
    net.optional_info = None if info is None else str(info)
    return net


def _load_mlp(mlp: HypernetworkMLP, state: dict, where: str) -> None:
    """Copy one torch state dict into ``mlp``: every key present, no key left over, shapes equal."""
    expected = mlp.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: the weights do not fit the file's options ({len(mlp.linear)} entries from its "
            f"layer_structure/activation/layer norm/dropout): missing {missing}, unexpected {unexpected}"
        )
    for key, value in state.items():
        _, i, name = key.split(".")
        array = value.detach().float().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)
        if array.shape != expected[key].shape:
            raise ValueError(f"{where}: {key} has shape {tuple(array.shape)}, expected {expected[key].shape}")
        getattr(mlp.linear[int(i)], name)[...] = jnp.asarray(array, jnp.float32)


def load_hypernetwork(path: str | os.PathLike, unet: nnx.Module, strength: float = 1.0) -> Hypernetwork:
    """Read a web-UI hypernetwork ``.pt`` (:func:`read_hypernetwork`) and attach it to ``unet`` at ``strength``
    (:func:`attach_hypernetwork`). Returns it (``.set_strength(s)`` changes s without recompiling)."""
    net = read_hypernetwork(path, strength)
    attach_hypernetwork(net, unet)
    return net


def save_hypernetwork(path: str | os.PathLike, hypernetwork: Hypernetwork | nnx.Module) -> Path:
    """Write ``hypernetwork`` (or the one attached to a UNet given instead) as the web UI's ``.pt``: plain
    tensors and Python values, readable by the web UI and by ``torch.load(weights_only=True)``."""
    import torch

    net = hypernetwork if isinstance(hypernetwork, Hypernetwork) else find_hypernetwork(hypernetwork)
    if net is None:
        raise ValueError("save_hypernetwork: the model has no hypernetwork attached")
    cfg = net.config
    data: dict = {
        width: tuple({k: torch.from_numpy(np.array(v)) for k, v in mlp.state_dict().items()} for mlp in pair)
        for width, pair in zip(net.widths, net.mlps)
    }
    data |= {
        "step": int(net.step),
        "name": net.name,
        "layer_structure": list(cfg.layer_structure),
        "activation_func": cfg.activation_func,
        "is_layer_norm": cfg.is_layer_norm,
        "weight_initialization": cfg.weight_initialization,
        "sd_checkpoint": net.sd_checkpoint,
        "sd_checkpoint_name": net.sd_checkpoint_name,
        "activate_output": cfg.activate_output,
        "use_dropout": cfg.use_dropout or any(cfg.dropout_structure),
        "dropout_structure": list(cfg.dropout_structure),
        "last_layer_dropout": cfg.dropout_structure[-2] != 0,
        "optional_info": net.optional_info,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HypernetworkTraining:
    """How :func:`train_hypernetwork` trains. ``widths`` None: every attention context width of the UNet (the
    text's and each level's, as the web UI's default modules cover SD1's 768, 320, 640 and 1280)."""

    widths: tuple[int, ...] | None = None
    config: HypernetworkConfig = HypernetworkConfig()
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0


def train_hypernetwork(sd, data: dict[str, np.ndarray], training: HypernetworkTraining | None = None, *,
                       progress: bool = True):  # fmt: skip
    """Train a new hypernetwork on ``sd``'s UNet (a :class:`sdjax.StableDiffusion`, float32) with the denoising
    loss on ``data`` (``sdjax.finetune.training_data``: latents, ids, weights); only :class:`HypernetworkParam`
    moves (``sdjax.train.fit``'s ``trainable``), the UNet and the text encoder stay bit for bit as they were.

    The hypernetwork stays attached to ``sd.unet``; returns (hypernetwork, fit's result).
    """
    from sdjax.tiny_sd import TextToLatent, conditional_diffusion_loss
    from sdjax.train import fit

    training = training or HypernetworkTraining()
    if sd.dtype != jnp.float32:
        raise ValueError("train a hypernetwork on a float32 pipeline (the optimizer keeps float32 weights)")
    widths = training.widths or sorted({_context_width(layer) for layer in _attention_layers(sd.unet)})
    net = Hypernetwork.create(widths, training.config, seed=training.seed)
    attach_hypernetwork(net, sd.unet)
    empty_ids = np.asarray(sd.tokenizer([""]), np.int32)[0]
    base = conditional_diffusion_loss(sd.schedule, empty_ids, 0.0)

    def loss_fn(model, batch, key):  # fresh dropout masks each step (the rng state travels frozen, unreturned)
        graphdef, keys, rest = nnx.split(model, nnx.RngKey, ...)
        salt = jax.random.randint(jax.random.fold_in(key, 1), (), 0, jnp.iinfo(jnp.int32).max)
        model = nnx.merge(graphdef, jax.tree.map(lambda k: jax.random.fold_in(k, salt), keys), rest)
        return base(model, batch, key)

    model = TextToLatent(sd.unet, sd.text_encoder)
    net.train()
    try:
        result = fit(
            model,
            loss_fn,
            data,
            steps=training.steps,
            batch_size=training.batch_size,
            optimizer=optax.adamw(training.learning_rate),
            seed=training.seed,
            progress=progress,
            desc="hypernetwork",
            trainable=HypernetworkParam,
        )
    finally:
        net.eval()
    net.step += training.steps
    return net, result
