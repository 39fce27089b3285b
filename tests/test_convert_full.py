"""Full-size Stable Diffusion 1.5 parity (marked slow: ``pytest -m slow tests/test_convert_full.py -s``).

The same checks as test_convert.py at the real shapes: the 860 M-parameter UNet, the 84 M VAE and
the 123 M CLIP text encoder, built by diffusers/transformers with random weights, saved as a diffusers
folder, loaded by sdjax, outputs compared in float32; then written as a CompVis single file and
converted back by diffusers' own single-file code, which must return the reference weights exactly.
About 10 GB of memory and several CPU minutes.

Tolerance: 1e-4 relative at full size, against 1e-5 for the tiny models. The UNet is 3× deeper than
the tiny ones and its convolutions sum over up to 2,560 × 9 = 23,040 products per output in float32,
so rounding differences between PyTorch's and XLA's summation orders grow with width and depth.
Measured on the 2-core CPU (2026-11-24, 475 s for both tests, sharing the machine with a training
run): text encoder 9.9e-7, UNet 1.4e-6, VAE encode 6.7e-6 (256²), VAE decode 1.1e-5 (to 256²) — the
VAE decoder, 30 convolutions deep at up to 512 channels, is the one just above 1e-5.
"""

import dataclasses
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import compvis, convert
from sdjax.models import CLIPTextConfig, UNetConfig, VAEConfig
from sdjax.tokenizer import CLIPTokenizer
from tests.helpers import nchw, nhwc, rel_err

pytestmark = pytest.mark.slow
RTOL = 1e-4

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")


def diffusers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    torch.manual_seed(0)
    start = time.time()
    diffusers.UNet2DConditionModel(**diffusers_kwargs(UNetConfig.sd15().to_diffusers())).save_pretrained(
        folder / "unet"
    )
    gc.collect()
    diffusers.AutoencoderKL(**diffusers_kwargs(VAEConfig.sd().to_diffusers())).save_pretrained(folder / "vae")
    text = CLIPTextConfig.sd1()
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**dataclasses.asdict(text))).save_pretrained(
        folder / "text_encoder"
    )
    CLIPTokenizer.from_bpe_file().save_folder(folder / "tokenizer")
    diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, set_alpha_to_one=False
    ).save_pretrained(folder / "scheduler")
    print(f"\nbuilt and saved the SD1.5-shaped reference in {time.time() - start:.0f} s")
    return folder


def test_sd15_full_size_parity(sd15_folder):
    start = time.time()
    sd = convert.load_diffusers(sd15_folder)
    print(f"sdjax load_diffusers: {time.time() - start:.1f} s")
    rng = np.random.default_rng(0)
    errors = {}

    ids = np.asarray(sd.tokenizer(["a photograph of an astronaut riding a horse", ""]))
    context = np.array(jax.jit(lambda i: sd.text_encoder(i).last_hidden_state)(jnp.asarray(ids)))  # writable
    ref = transformers.CLIPTextModel.from_pretrained(sd15_folder / "text_encoder").eval()
    with torch.no_grad():
        errors["text encoder"] = rel_err(context, ref(torch.from_numpy(ids)).last_hidden_state.numpy())
    del ref

    x = rng.standard_normal((2, 64, 64, 4)).astype(np.float32)
    t = np.array([999, 10])
    unet_fn = nnx_jit(sd.unet)
    start = time.time()
    ours = np.asarray(unet_fn(jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)))
    print(f"sdjax UNet, batch 2 at 64×64 (compile + run): {time.time() - start:.1f} s")
    ref = diffusers.UNet2DConditionModel.from_pretrained(sd15_folder / "unet").eval()
    start = time.time()
    with torch.no_grad():
        want = ref(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    print(f"diffusers UNet, batch 2 at 64×64: {time.time() - start:.1f} s")
    errors["unet"] = rel_err(ours, nhwc(want))
    del ref
    gc.collect()

    z = rng.standard_normal((1, 32, 32, 4)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    decoded = np.asarray(jax.jit(sd.vae.decode)(jnp.asarray(z)))
    posterior = sd.vae.encode(jnp.asarray(image))
    ref = diffusers.AutoencoderKL.from_pretrained(sd15_folder / "vae").eval()
    with torch.no_grad():
        errors["vae decode"] = rel_err(decoded, nhwc(ref.decode(torch.from_numpy(nchw(z))).sample.numpy()))
        moments = ref.quant_conv(ref.encoder(torch.from_numpy(nchw(image)))).numpy()
    errors["vae encode"] = rel_err(jnp.concatenate([posterior.mean, posterior.logvar], -1), nhwc(moments))
    print("max relative errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < RTOL, errors


def nnx_jit(module):
    """``module``'s forward pass compiled as one XLA program (op by op, 860 M parameters run slowly)."""
    step = nnx.jit(lambda m, *a: m(*a))
    return lambda *a: step(module, *a)


def test_sd15_single_file_agrees_with_diffusers(sd15_folder, tmp_path):
    from safetensors.torch import load_file

    sd = convert.load_diffusers(sd15_folder)
    start = time.time()
    path = compvis.save_single_file(sd, tmp_path / "sd15.safetensors")
    print(f"\nwrote the CompVis single file ({path.stat().st_size / 1e9:.2f} GB) in {time.time() - start:.0f} s")
    del sd
    gc.collect()
    ckpt = load_file(str(path))
    for part, convert_fn in (
        ("unet", lambda c: single_file_utils.convert_ldm_unet_checkpoint(ckpt, c)),
        ("vae", lambda c: single_file_utils.convert_ldm_vae_checkpoint(ckpt, c)),
        ("text_encoder", lambda c: single_file_utils.convert_ldm_clip_checkpoint(ckpt)),
    ):
        config = convert._read_json(sd15_folder / part / "config.json")
        got = {k.removeprefix("text_model."): v for k, v in convert_fn(config).items()}
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        want = {k.removeprefix("text_model."): v for k, v in load_file(str(sd15_folder / part / name)).items()}
        assert got.keys() == want.keys(), (part, sorted(got.keys() ^ want.keys())[:5])
        assert all(torch.equal(got[k], want[k]) for k in want), part
        del got, want
        gc.collect()
