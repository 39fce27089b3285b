"""benchmarks/memory.py reads XLA's memory analysis of SD's programs without allocating any weights.

The tiny SD at two small image sizes, 64² and 64×128 (twice the pixels), bfloat16: every program has its
row, the byte counts are the ones the abstract shapes imply (the weights stay bfloat16, the decoded image
is float32, the gradients are the weights' size), and the UNet's temporaries grow with the image.
No timing is asserted.
"""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

pytestmark = pytest.mark.slow  # a tool's check, moved from the default run to keep it under 12 min (docs/testing.md)

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "memory.py"


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("sdjax_benchmarks_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def report(memory, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.md"
    argv = ["--size", "tiny", "--sizes", "64x64,64x128", "--tile", "8", "--train-batch", "2", "--train-latent", "8",
            "--out", str(out)]  # fmt: skip
    result = memory.main(argv)
    assert out.read_text() == result.text
    return result


def rows(report) -> dict[tuple[str, str], object]:
    return {(r.program, r.size): r for r in report.results}


def test_report_has_a_row_per_program(report):
    programs = [
        ("UNet forward, batch 2", "64²"),
        ("UNet forward, batch 2", "64×128"),
        ("VAE decode, 1 image", "64²"),
        ("VAE decode, 1 image", "64×128"),
        ("VAE decode, one 8² latent tile", "64²"),
        ("UNet value_and_grad, batch 2", "64²"),
    ]
    assert sorted(rows(report)) == sorted(programs)
    for program, size in programs:
        assert f"| {program} | {size} | " in report.text
    assert "caveat" in report.text and "estimate" in report.text
    # the tile is the 64² decode's very program: the same figures, not compiled twice
    tile, decode = rows(report)[programs[4]], rows(report)[programs[2]]
    assert (tile.arguments, tile.temp, tile.output) == (decode.arguments, decode.temp, decode.output)
    assert "as the 64² decode" in report.text


def test_byte_counts_follow_the_abstract_shapes(memory, report):
    from sdjax.models.unet import UNet2D
    from sdjax.models.vae import AutoencoderKL
    from sdjax.speed import CONFIGS

    unet_cfg, vae_cfg, _ = CONFIGS["tiny"]
    unet_state = memory.abstract_model(UNet2D, unet_cfg, jnp.bfloat16)[1]
    unet_params = memory.count(unet_state)
    vae_state = memory.abstract_model(AutoencoderKL, vae_cfg, jnp.bfloat16)[1]
    decoder_params = memory.count([vae_state["decoder"], vae_state["post_quant_conv"]])
    by = rows(report)

    # UNet at 64² (8² latents, batch 2): bf16 weights, bf16 x and context, int32 t; a bf16 output
    unet = by[("UNet forward, batch 2", "64²")]
    inputs = 2 * 8 * 8 * 4 * 2 + 2 * 4 + 2 * 77 * unet_cfg.cross_attention_dim * 2
    assert unet.arguments == 2 * unet_params + inputs
    assert unet.output == 2 * 8 * 8 * 4 * 2

    # VAE decode at 64×128: the decoder's bf16 weights (jit drops the encoder's, unread) and float32
    # latents in, one float32 image out
    vae = by[("VAE decode, 1 image", "64×128")]
    assert vae.arguments == 2 * decoder_params + 8 * 16 * 4 * 4
    assert vae.output == 64 * 128 * 3 * 4

    # value_and_grad: the float32 loss and a bf16 gradient for every weight (and, on the CPU, the table of
    # the output tuple: a pointer per output)
    train = by[("UNet value_and_grad, batch 2", "64²")]
    outputs = 1 + len(jax.tree.leaves(unet_state))
    assert 0 <= train.output - (4 + 2 * unet_params) <= 8 * outputs
    assert train.temp > unet.temp  # the backward pass keeps the forward's activations


def test_temporaries_grow_with_the_image(report):
    by = rows(report)
    for program in ("UNet forward, batch 2", "VAE decode, 1 image"):
        small, large = by[(program, "64²")], by[(program, "64×128")]
        assert large.temp > small.temp > 0, program
        assert large.total > small.total


def test_finetune_steps(memory, tmp_path):
    """``--finetune``: sdjax.finetune's whole training step, jitted with the state donated. The arguments hold the
    float32 trained weights once (LoRA: the adapters) plus the optimizer's state — Adam two more copies, Adafactor a
    factored fraction — and the frozen rest; the new state comes back in the donated buffers (alias = the state)."""
    argv = ["--size", "tiny", "--finetune", "--finetune-latent", "8", "--finetune-batches", "1",
            "--finetune-methods", "lora,full", "--out", str(tmp_path / "ft.md")]  # fmt: skip
    result = memory.main(argv)
    by = {r.program: r for r in result.results}
    runs = ["full, adafactor, batch 1", "full, adam, batch 1", "lora, adam, batch 1"]
    assert sorted(by) == sorted(runs + [f"{run}, remat" for run in runs])
    adam, factored, lora = by["full, adam, batch 1"], by["full, adafactor, batch 1"], by["lora, adam, batch 1"]
    trained = 4 * memory.finetune_step("full", 1, 8, False, "adam", "tiny")[4]  # bytes of float32 UNet weights
    # Adam's two moments against Adafactor's one: the tiny model's matrices are too small (< 128) for optax to factor
    # (measured: 1.02 × the weights less; at SD1.5's size the factored state is megabytes, benchmarks/MEMORY.md)
    assert adam.arguments - factored.arguments > 0.9 * trained
    for r in (adam, factored, lora):
        assert r.alias > 0.99 * (r.output - 4096)  # the state (all of the output but the loss) reuses its buffers
    assert "| full, adam, batch 1 | 64² |" in result.text
