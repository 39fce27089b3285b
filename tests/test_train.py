"""The training utility: EMA, checkpoints that resume bit-for-bit after a kill, data parallelism
that equals single-device training, and errors that name the problem."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from sdjax import io
from sdjax.models import Autoencoder, AutoencoderConfig, autoencoder_loss
from sdjax.train import create_train_state, fit, restore_checkpoint
from tests.helpers import leaves, run_fit, toy_autoencoder, toy_data

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env):
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=300,
    )
    return out


def test_ema_follows_its_formula():
    """After each step θ_ema ← d·θ_ema + (1 − d)·θ; check it against the parameters step by step."""
    params = []
    for steps in (1, 2):
        params.append(leaves(run_fit(steps, ema=None).state.params))
    ema = leaves(run_fit(2, ema=0.9).state.ema)
    init = leaves(nnx.state(toy_autoencoder(seed=0), nnx.Param))
    for e, p0, p1, p2 in zip(ema, init, *params):
        np.testing.assert_allclose(e, 0.9 * (0.9 * p0 + 0.1 * p1) + 0.1 * p2, rtol=1e-6, atol=1e-7)


def test_checkpoint_resume_after_kill_is_bit_for_bit(tmp_path):
    """Train 7 steps in a process that then dies by SIGKILL (no clean-up runs), resume to 12 steps in
    this process, and compare with an uninterrupted 12-step run: every array identical."""
    ckpt = tmp_path / "ckpt.safetensors"
    child = run_python(f"""
        import os, signal
        from tests.helpers import run_fit
        run_fit(7, checkpoint={str(ckpt)!r}, checkpoint_every=3)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert child.returncode == -9, child.stderr
    resumed = run_fit(12, checkpoint=ckpt)
    straight = run_fit(12)
    assert int(resumed.state.step) == 12
    for a, b in zip(leaves(resumed.state), leaves(straight.state)):
        np.testing.assert_array_equal(a, b)
    assert resumed.history["step"] == list(range(1, 13))
    assert resumed.history["loss"] == straight.history["loss"]


@pytest.mark.devices(4)
def test_data_parallel_equals_single_device():
    """Four virtual CPU devices (a subprocess, tests/conftest.py) splitting each batch give the same parameters as one
    device doing the whole batch (up to float32 summation order in the gradient all-reduce).

    SGD, not Adam: the attention key bias has an exactly-zero true gradient (softmax is invariant to
    adding q·b_k to every logit), so its computed gradient is rounding noise, which Adam's
    normalisation g/√v blows up to ±lr in whichever direction the noise points on each layout.
    With SGD that bias stays ~1e-9, hence the small absolute tolerance.
    """
    assert len(jax.devices()) == 4, jax.devices()
    one = run_fit(5, devices=jax.devices()[:1], optimizer=optax.sgd(0.05, momentum=0.9))
    four = run_fit(5, devices=jax.devices(), optimizer=optax.sgd(0.05, momentum=0.9))
    losses = np.array(four.history["loss"]) / np.array(one.history["loss"])
    np.testing.assert_allclose(losses, 1, rtol=1e-5)
    for a, b in zip(leaves(four.state.params), leaves(one.state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # atol: leaves that stay ~0 (the key bias)
    sharding = four.state.params["encoder"]["conv_in"]["kernel"][...].sharding
    assert sharding.is_fully_replicated and len(sharding.device_set) == 4  # replicated over all four


@pytest.mark.devices(4)
def test_batch_size_not_divisible_by_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        model = toy_autoencoder(seed=0)
        fit(model, autoencoder_loss, toy_data(), steps=1, batch_size=6, devices=jax.devices()[:4] * 1, progress=False)


def test_restore_into_a_different_model_names_the_mismatch(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    run_fit(1, checkpoint=ckpt)
    other = Autoencoder(
        AutoencoderConfig(block_out_channels=(8, 16, 16), latent_channels=2, norm_num_groups=4), rngs=nnx.Rngs(0)
    )
    _, template, _ = create_train_state(other, optax.adam(1e-2), 0, 0.9)
    with pytest.raises(ValueError, match="missing .* tensors.*different config"):
        restore_checkpoint(ckpt, template)


def test_model_weights_round_trip_and_bad_files(tmp_path):
    model = run_fit(2).model
    io.save_model(tmp_path / "m.safetensors", model, {"config": "tiny"})
    fresh = io.load_model(tmp_path / "m.safetensors", toy_autoencoder(seed=1))
    for a, b in zip(leaves(nnx.state(fresh, nnx.Param)), leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(FileNotFoundError, match="no such file"):
        io.load_model(tmp_path / "nope.safetensors", fresh)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        io.load_model(tmp_path / "cut.safetensors", fresh)
    with pytest.raises(ValueError, match="not an sdjax training checkpoint"):
        restore_checkpoint(tmp_path / "m.safetensors", create_train_state(fresh, optax.adam(1e-2), 0, None)[1])
