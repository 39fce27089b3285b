"""AUTOMATIC1111 hypernetworks (sdjax.hypernetwork): parity with a float64 NumPy oracle of the web UI's forward,
the hook in the UNet's attention, strength, the .pt round trip, bad files, and a short training run.

The oracle (:func:`oracle_f`) is written from the FILE FORMAT — the state dict's ``linear.<position>`` keys and the
option fields, read with the web UI's defaults — not from sdjax's code: it walks the Sequential positions itself
(Linear, activation unless linear/None and, after the last Linear, only with activate_output, LayerNorm if
is_layer_norm, Dropout if its p > 0), and computes c + s · f(c) in float64. Its activations are checked against
torch's own modules in float64 first (:func:`test_oracle_activations_are_torchs`).

Tolerance: 1e-5 relative (max-abs error / max-abs oracle), float32 against float64.
"""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import hypernetwork as hn
from sdjax.speed import random_components
from tests.helpers import apply, rel_err

torch = pytest.importorskip("torch")

RTOL = 1e-5

# ---------------------------------------------------------------------------------------------------
# the float64 oracle, from the format
# ---------------------------------------------------------------------------------------------------


def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


ORACLE_ACT = {
    "relu": lambda x: np.maximum(x, 0),
    "leakyrelu": lambda x: np.where(x > 0, x, 0.01 * x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    "celu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    "selu": lambda x: (
        1.0507009873554804934193349852946
        * np.where(x > 0, x, 1.6732632423543772848170429916717 * np.expm1(np.minimum(x, 0)))
    ),
    "swish": lambda x: x * np.clip(x + 3, 0, 6) / 6,  # the web UI maps "swish" to torch's Hardswish
    "hardswish": lambda x: x * np.clip(x + 3, 0, 6) / 6,
    "silu": lambda x: x / (1 + np.exp(-x)),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2))),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "hardsigmoid": lambda x: np.clip(x + 3, 0, 6) / 6,
    "hardtanh": lambda x: np.clip(x, -1, 1),
    "relu6": lambda x: np.clip(x, 0, 6),
    "rrelu": lambda x: np.where(x >= 0, x, (1 / 8 + 1 / 3) / 2 * x),  # eval mode: the mean slope
    "logsigmoid": lambda x: -(np.maximum(-x, 0) + np.log1p(np.exp(-np.abs(x)))),  # torch: no threshold
    "softplus": _softplus,
    "softsign": lambda x: x / (1 + np.abs(x)),
    "tanhshrink": lambda x: x - np.tanh(x),
    "softshrink": lambda x: np.where(x > 0.5, x - 0.5, np.where(x < -0.5, x + 0.5, 0.0)),
    "hardshrink": lambda x: np.where(np.abs(x) > 0.5, x, 0.0),
}
TORCH_ACT = {"swish": "Hardswish", "leakyrelu": "LeakyReLU", "relu6": "ReLU6", "rrelu": "RReLU", "logsigmoid":
             "LogSigmoid", "selu": "SELU", "celu": "CELU", "elu": "ELU", "relu": "ReLU", "gelu": "GELU",
             "silu": "SiLU"}  # fmt: skip


def file_options(d: dict) -> dict:
    """The options of a hypernetwork dict, missing ones as the web UI reads them."""
    ls = list(d.get("layer_structure") or [1, 2, 1])
    drop = d.get("dropout_structure")
    if drop is None:
        use = bool(d.get("use_dropout", False))
        last = bool(d.get("last_layer_dropout", False))
        drop = [0.0] * len(ls) if not use else [0.0] + [0.3] * (len(ls) - 3) + [0.3 if last else 0.0, 0.0]
    return {"ls": ls, "act": d.get("activation_func"), "norm": bool(d.get("is_layer_norm", False)),
            "out": bool(d.get("activate_output", True)), "drop": drop}  # fmt: skip


def oracle_entries(dim: int, o: dict) -> list[tuple[str, tuple]]:
    """The Sequential's entries in order: (kind, shape of its weight or ())."""
    ls, n, entries = o["ls"], len(o["ls"]), []
    for i in range(n - 1):
        a, b = int(dim * ls[i]), int(dim * ls[i + 1])
        entries.append(("linear", (b, a)))
        if o["act"] not in (None, "linear") and (i < n - 2 or o["out"]):
            entries.append((o["act"], (1,) if o["act"] == "prelu" else ()))
        if o["norm"]:
            entries.append(("norm", (b,)))
        if o["drop"][i + 1] > 0:
            entries.append(("dropout", ()))
    return entries


def random_state(dim: int, o: dict, rng) -> dict:
    """A state dict for these options, every value random (weights ~ N(0, 1/in), gains around 1)."""
    state = {}
    for i, (kind, shape) in enumerate(oracle_entries(dim, o)):
        if kind == "linear":
            state[f"linear.{i}.weight"] = torch.tensor(rng.normal(0, 1 / np.sqrt(shape[1]), shape), dtype=torch.float32)
            state[f"linear.{i}.bias"] = torch.tensor(rng.normal(0, 0.5, shape[:1]), dtype=torch.float32)
        elif kind == "norm":
            state[f"linear.{i}.weight"] = torch.tensor(1 + 0.3 * rng.normal(size=shape), dtype=torch.float32)
            state[f"linear.{i}.bias"] = torch.tensor(0.3 * rng.normal(size=shape), dtype=torch.float32)
        elif kind == "prelu":
            state[f"linear.{i}.weight"] = torch.tensor(rng.uniform(0.1, 0.5, shape), dtype=torch.float32)
    return state


def oracle_f(state: dict, dim: int, o: dict, x: np.ndarray) -> np.ndarray:
    """f(x) in float64 from the state dict (the residual and strength are the caller's)."""
    w = lambda i, n: state[f"linear.{i}.{n}"].double().numpy()  # noqa: E731
    h = np.asarray(x, np.float64)
    for i, (kind, _) in enumerate(oracle_entries(dim, o)):
        if kind == "linear":
            h = h @ w(i, "weight").T + w(i, "bias")
        elif kind == "norm":
            mu = h.mean(-1, keepdims=True)
            h = (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w(i, "weight") + w(i, "bias")
        elif kind == "prelu":
            h = np.where(h >= 0, h, w(i, "weight") * h)
        elif kind != "dropout":  # dropout: identity at inference
            h = ORACLE_ACT[kind](h)
    return h


def oracle_contexts(d: dict, c: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(c + s f_k(c), c + s f_v(c)) for the module of c's width in file dict ``d``."""
    o, dim = file_options(d), c.shape[-1]
    sd_k, sd_v = d[dim]
    c = np.asarray(c, np.float64)
    return c + s * oracle_f(sd_k, dim, o, c), c + s * oracle_f(sd_v, dim, o, c)


def make_file(path, widths, options: dict, seed=0, old_names=False) -> dict:
    """A hypernetwork .pt with random weights: {width: (sd_k, sd_v)} plus ``options`` as given."""
    rng = np.random.default_rng(seed)
    d = {w: tuple(random_state(w, file_options(options), rng) for _ in range(2)) for w in widths}
    if old_names:
        rename = {"linear.0.weight": "linear1.weight", "linear.0.bias": "linear1.bias",
                  "linear.1.weight": "linear2.weight", "linear.1.bias": "linear2.bias"}  # fmt: skip
        d = {w: tuple({rename[k]: v for k, v in sd.items()} for sd in pair) for w, pair in d.items()}
    d |= options
    torch.save(d, path)
    return torch.load(path, weights_only=True) if not old_names else _renamed_back(d)


def _renamed_back(d):
    back = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
            "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}  # fmt: skip
    return {k: (tuple({back[n]: t for n, t in sd.items()} for sd in v) if isinstance(k, int) else v)
            for k, v in d.items()}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# the module against the oracle
# ---------------------------------------------------------------------------------------------------

ACTS = sorted(ORACLE_ACT) + ["prelu"]


def test_oracle_activations_are_torchs():
    """The oracle's activations against torch's modules (the web UI's dict: lower-cased torch.nn class names,
    "swish" = Hardswish), float64, eval mode. Tolerance 1e-12; measured 1.5e-16."""
    x = torch.linspace(-25, 25, 2001, dtype=torch.float64)
    classes = {name.lower(): getattr(torch.nn, name) for name in dir(torch.nn)}
    for name, f in ORACLE_ACT.items():
        module = getattr(torch.nn, TORCH_ACT[name]) if name in TORCH_ACT else classes[name]
        expected = module().eval()(x).numpy()
        assert rel_err(f(x.numpy()), expected) < 1e-12, name


CASES = {
    "linear-defaults": {},  # an old file: every option missing (layer_structure (1, 2, 1), no activation)
    "relu-norm-dropout": {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True,
                          "use_dropout": True, "last_layer_dropout": True, "activate_output": False},
    "leakyrelu-deep-out": {"layer_structure": [1, 1.5, 2, 1], "activation_func": "leakyrelu",
                           "activate_output": True, "dropout_structure": [0, 0.1, 0.2, 0]},
    "swish-norm-deep": {"layer_structure": [1, 2, 2, 1], "activation_func": "swish", "is_layer_norm": True,
                        "use_dropout": True, "activate_output": False},
    "elu-missing-activate-output": {"layer_structure": [1, 2, 1], "activation_func": "elu"},  # reads as True
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_module_matches_oracle(tmp_path, case):
    """Loaded from a file, the two contexts for each width at strengths 1 and 0.6 match the oracle.
    Tolerance 1e-5 relative; measured ≤ 2.1e-7 (float32 vs float64)."""
    d = make_file(tmp_path / "h.pt", [8, 12], CASES[case], seed=len(case))
    net = hn.read_hypernetwork(tmp_path / "h.pt")
    rng = np.random.default_rng(1)
    for width in (8, 12):
        c = rng.normal(size=(2, 5, width)).astype(np.float32)
        for s in (1.0, 0.6):
            net.set_strength(s)
            got = net(jnp.asarray(c))
            for g, e in zip(got, oracle_contexts(d, c, s)):
                assert rel_err(g, e) < RTOL, (case, width, s, rel_err(g, e))
                assert rel_err(g - c, e - c) < 1e-4  # the update itself, not only c + small


def test_every_activation_matches_oracle(tmp_path):
    """Each activation, applied after both Linears (activate_output) with layer norm. Tolerance 1e-5; measured
    ≤ 4.0e-7."""
    for act in ACTS:
        opts = {"layer_structure": [1, 2, 1], "activation_func": act, "is_layer_norm": True, "activate_output": True}
        d = make_file(tmp_path / f"{act}.pt", [16], opts, seed=3)
        net = hn.read_hypernetwork(tmp_path / f"{act}.pt", strength=0.8)
        c = 2 * np.random.default_rng(2).normal(size=(1, 7, 16)).astype(np.float32)
        for g, e in zip(net(jnp.asarray(c)), oracle_contexts(d, c, 0.8)):
            assert rel_err(g, e) < RTOL, (act, rel_err(g, e))


def test_old_linear1_linear2_names(tmp_path):
    """The first files: ``linear1``/``linear2`` names and no options. Tolerance 1e-5."""
    d = make_file(tmp_path / "old.pt", [8], {}, old_names=True)
    net = hn.read_hypernetwork(tmp_path / "old.pt")
    c = np.random.default_rng(0).normal(size=(1, 3, 8)).astype(np.float32)
    for g, e in zip(net(jnp.asarray(c)), oracle_contexts(d, c, 1.0)):
        assert rel_err(g, e) < RTOL


def test_training_mode_ignores_strength_and_drops(tmp_path):
    """The web UI trains at multiplier 1 with dropout on: in .train() the strength is ignored and masks vary."""
    d = make_file(tmp_path / "h.pt", [8], {"activation_func": "relu", "use_dropout": True, "last_layer_dropout": True})
    net = hn.read_hypernetwork(tmp_path / "h.pt", strength=0.25)
    c = np.random.default_rng(0).normal(size=(1, 64, 8)).astype(np.float32)
    net.train()
    k, _ = net(jnp.asarray(c))
    full, _ = oracle_contexts(d, c, 1.0)
    assert not np.allclose(k, full, rtol=1e-4)  # dropped units
    net.eval()
    assert rel_err(net(jnp.asarray(c))[0], oracle_contexts(d, c, 0.25)[0]) < RTOL


# ---------------------------------------------------------------------------------------------------
# in the UNet
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def components():
    return random_components("tiny")


def _attention_oracle(layer, x, ck, cv):
    """softmax(Q Kᵀ/√d) V W_o in float64 from the layer's weights, K = ck W_k, V = cv W_v."""
    w = lambda lin: np.asarray(lin.kernel[...], np.float64)  # noqa: E731
    q, k, v = np.asarray(x, np.float64) @ w(layer.to_q), ck @ w(layer.to_k), cv @ w(layer.to_v)
    h = layer.heads
    split = lambda a: a.reshape(*a.shape[:2], h, -1).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v
    out = out.transpose(0, 2, 1, 3).reshape(*x.shape[:2], -1)
    return out @ w(layer.to_out) + np.asarray(layer.to_out.bias[...], np.float64)


def test_unet_layers_use_the_oracle_contexts(tmp_path, components):
    """Attached to the tiny UNet (blocks 32, 64; text 32), the web UI's rule: every attention whose context width
    the file has — cross-attention (text, 32) and self-attention (its own input: 32 at level 0, 64 in the mid
    block). A cross- and a self-attention layer each equal attention over the oracle's K/V contexts.
    Tolerance 1e-5; measured ≤ 4.3e-7."""
    unet = nnx.merge(*nnx.split(components.unet))  # a copy of the graph: the fixture's UNet stays bare
    opts = {"layer_structure": [1, 2, 1], "activation_func": "mish", "is_layer_norm": True}
    d = make_file(tmp_path / "h.pt", [32, 64, 1024], opts)
    net = hn.load_hypernetwork(tmp_path / "h.pt", unet, strength=0.7)
    # all 8 attentions: attn1 and attn2 of level 0's 3 transformers (1 down, 2 up) and the mid block's attn2 see a
    # 32-wide context, the mid block's attn1 a 64-wide one; the file's 1024 matches nothing and is left unused
    layers = [m for _, m in nnx.iter_modules(unet) if isinstance(m, hn.Attention)]
    assert sum(m.hypernetwork is net for m in layers) == 8 == len(layers)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 32)).astype(np.float32)
    text = rng.normal(size=(2, 6, 32)).astype(np.float32)
    for layer, ctx in ((block.attn2, text), (block.attn1, x)):
        ck, cv = oracle_contexts(d, ctx, 0.7)
        got = apply(layer, jnp.asarray(x), jnp.asarray(ctx) if layer is block.attn2 else None)
        assert rel_err(got, _attention_oracle(layer, x, ck, cv)) < RTOL
    mid = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    xm = rng.normal(size=(1, 4, 64)).astype(np.float32)
    ck, cv = oracle_contexts(d, xm, 0.7)
    assert rel_err(apply(mid, jnp.asarray(xm), None), _attention_oracle(mid, xm, ck, cv)) < RTOL


def test_strength_zero_is_the_base_model_bit_for_bit(tmp_path, components):
    unet = nnx.merge(*nnx.split(components.unet))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 8, 8, 4)), jnp.float32)
    t, ctx = jnp.array([500]), jnp.asarray(rng.normal(size=(1, 6, 32)), jnp.float32)
    base = np.asarray(apply(unet, x, t, ctx))
    make_file(tmp_path / "h.pt", [32, 64], {"activation_func": "relu", "activate_output": False})
    net = hn.load_hypernetwork(tmp_path / "h.pt", unet, strength=1.0)
    changed = np.asarray(apply(unet, x, t, ctx))
    assert rel_err(changed, base) > 1e-3  # the hypernetwork does act
    net.set_strength(0.0)
    np.testing.assert_array_equal(np.asarray(apply(unet, x, t, ctx)), base)
    assert hn.remove_hypernetwork(unet) == 8 and hn.find_hypernetwork(unet) is None
    np.testing.assert_array_equal(np.asarray(apply(unet, x, t, ctx)), base)


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    """save → torch.load(weights_only=True) → read: the same tensors, options and bookkeeping, exactly."""
    opts = {"layer_structure": [1, 1.5, 1], "activation_func": "prelu", "is_layer_norm": True,
            "dropout_structure": [0, 0.2, 0], "activate_output": True, "name": "mine", "step": 123,
            "sd_checkpoint": "abc123", "sd_checkpoint_name": "v1-5"}  # fmt: skip
    d = make_file(tmp_path / "a.pt", [8, 16], opts)
    net = hn.read_hypernetwork(tmp_path / "a.pt")
    hn.save_hypernetwork(tmp_path / "b.pt", net)
    e = torch.load(tmp_path / "b.pt", weights_only=True)  # plain tensors and values
    for width in (8, 16):
        for sd_a, sd_b in zip(d[width], e[width]):
            assert sorted(sd_a) == sorted(sd_b)
            for k in sd_a:
                assert torch.equal(sd_a[k], sd_b[k]), k
    for key in ("layer_structure", "activation_func", "is_layer_norm", "activate_output", "name", "step",
                "sd_checkpoint", "sd_checkpoint_name"):  # fmt: skip
        assert e[key] == opts[key], key
    assert e["dropout_structure"] == [0, 0.2, 0] and e["use_dropout"] is True and e["last_layer_dropout"] is True
    again = hn.read_hypernetwork(tmp_path / "b.pt")
    assert again.config == net.config and again.widths == net.widths and again.step == 123
    c = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 16)), jnp.float32)
    for a, b in zip(net(c), again(c)):
        np.testing.assert_array_equal(a, b)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_bad_files_get_one_clear_error(tmp_path, components):
    evil = tmp_path / "evil.pt"
    torch.save({768: _Evil(), "name": "x"}, evil)  # never executed: weights_only refuses the global
    with pytest.raises(ValueError, match="holds code"):
        hn.read_hypernetwork(evil)
    with pytest.raises(FileNotFoundError, match="no such hypernetwork"):
        hn.read_hypernetwork(tmp_path / "missing.pt")
    (tmp_path / "h.safetensors").write_bytes(b"{}")
    with pytest.raises(ValueError, match=r"\.pt files"):
        hn.read_hypernetwork(tmp_path / "h.safetensors")
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}}, tmp_path / "ti.pt")
    with pytest.raises(ValueError, match="no hypernetwork modules"):
        hn.read_hypernetwork(tmp_path / "ti.pt")
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2]) + b"junk")
    with pytest.raises(ValueError, match="junk.pt is not a readable torch"):
        hn.read_hypernetwork(tmp_path / "junk.pt")
    # weights that do not fit the options: a missing key, a wrong shape
    d = make_file(tmp_path / "ok.pt", [8], {"activation_func": "relu", "is_layer_norm": True})
    broken = {**d, 8: ({k: v for k, v in d[8][0].items() if k != "linear.2.bias"}, d[8][1])}
    torch.save(broken, tmp_path / "missing_key.pt")
    with pytest.raises(ValueError, match=r"missing \['linear.2.bias'\]"):
        hn.read_hypernetwork(tmp_path / "missing_key.pt")
    torch.save({**d, "is_layer_norm": False}, tmp_path / "options.pt")
    with pytest.raises(ValueError, match="unexpected"):
        hn.read_hypernetwork(tmp_path / "options.pt")
    wrong = {**d, 8: ({**d[8][0], "linear.0.weight": torch.zeros(16, 9)}, d[8][1])}
    torch.save(wrong, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"linear.0.weight has shape \(16, 9\), expected \(16, 8\)"):
        hn.read_hypernetwork(tmp_path / "shape.pt")
    torch.save({**d, "activation_func": "glu"}, tmp_path / "glu.pt")
    with pytest.raises(ValueError, match="activation 'glu' is not supported"):
        hn.read_hypernetwork(tmp_path / "glu.pt")
    # widths for another model: SD1's 768 on the 32-wide tiny UNet
    make_file(tmp_path / "sd1.pt", [768], {})
    unet = nnx.merge(*nnx.split(components.unet))
    with pytest.raises(ValueError, match=r"widths \[768\] match no attention.*\[32, 64\]"):
        hn.load_hypernetwork(tmp_path / "sd1.pt", unet)
    make_file(tmp_path / "tiny.pt", [32], {})
    hn.load_hypernetwork(tmp_path / "tiny.pt", unet)
    with pytest.raises(ValueError, match="remove_hypernetwork"):
        hn.load_hypernetwork(tmp_path / "tiny.pt", unet)
    with pytest.raises(ValueError, match="layer_structure"):
        hn.HypernetworkConfig(layer_structure=(2, 1))


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------


def flat(state) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.slow  # 65 s on one CPU core, most of it compiling the training step
def test_training_moves_only_the_hypernetwork(tmp_path):
    """A few steps on the bundled tiny model: the fixed-noise held-out loss on the training images falls, only
    hypernetwork weights change, UNet and text encoder stay bit for bit, and the result saves and reloads."""
    from sdjax import StableDiffusion, finetune, tiny_sd
    from sdjax.data import shapes

    sd = StableDiffusion.from_pretrained(tiny_sd.BUNDLE)
    sd.progress = False
    samples = shapes.scenes_of("crescent", 2, 0)
    images = np.stack([shapes.render(s, 64) for s in samples])
    prompts = [shapes.caption(s) for s in samples]
    data = finetune.training_data(sd, images, prompts, finetune.FinetuneConfig(views_per_image=8, seed=0))
    before_unet, before_text = flat(nnx.state(sd.unet, nnx.Param)), flat(nnx.state(sd.text_encoder))
    loss_before = finetune.heldout_loss(sd, images, prompts, n_t=4)
    config = hn.HypernetworkConfig(activation_func="relu", use_dropout=True, last_layer_dropout=True)  # p = 0.3
    training = hn.HypernetworkTraining(config=config, steps=40, batch_size=8, learning_rate=3e-3)
    net, result = hn.train_hypernetwork(sd, data, training, progress=False)
    loss_after = finetune.heldout_loss(sd, images, prompts, n_t=4)
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)
    assert net.widths == (64, 128) and net.step == 40 and len(result.history["loss"]) == 40
    after_unet = flat(nnx.state(sd.unet, nnx.All(nnx.Param, nnx.Not(hn.HypernetworkParam))))
    for before, after in ((before_unet, after_unet), (before_text, flat(nnx.state(sd.text_encoder)))):
        assert sorted(before) == sorted(after)
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert flat(nnx.state(sd.unet, hn.HypernetworkParam))  # the hypernetwork's weights: moved (loss fell)
    hn.save_hypernetwork(tmp_path / "trained.pt", sd.unet)
    again = hn.read_hypernetwork(tmp_path / "trained.pt")
    c = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 64)), jnp.float32)
    for a, b in zip(net(c), again(c)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # three pipeline runs: 20–45 s on one CPU core (warm or cold compilation cache)
def test_txt2img_hypernetwork_flag(tmp_path, capsys):
    """``sdjax txt2img --hypernetwork PATH:STRENGTH`` on the bundled model (context and level-0 width 64): the
    flag loads the file; at strength 0 the image equals the plain run's exactly, at 1 it differs."""
    from PIL import Image

    from sdjax.cli import main

    make_file(tmp_path / "h.pt", [64], {"activation_func": "relu"})
    common = ["txt2img", "--ddim_steps", "2", "--precision", "full", "--skip_grid", "--seed", "1"]
    images = {}
    for name, extra in (("plain", []), ("zero", ["--hypernetwork", f"{tmp_path / 'h.pt'}:0"]),
                        ("one", ["--hypernetwork", str(tmp_path / "h.pt")])):  # fmt: skip
        assert main([*common, "--outdir", str(tmp_path / name), *extra]) == 0
        images[name] = np.asarray(Image.open(tmp_path / name / "samples" / "00000.png"))
    assert "hypernetwork" in capsys.readouterr().out
    np.testing.assert_array_equal(images["zero"], images["plain"])
    assert np.abs(images["one"].astype(int) - images["plain"]).max() > 0
