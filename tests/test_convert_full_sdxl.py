"""Full-size SDXL base parity (marked slow: ``pytest -m slow tests/test_convert_full_sdxl.py -s``).

test_pipeline_sdxl.py's checks at the real shapes: the 2.6 B-parameter UNet (``UNetConfig.sdxl()``) and both
text encoders (CLIP ViT-L, 123 M; OpenCLIP bigG with its projection, 695 M), built by diffusers/transformers
with random weights and saved as diffusers folders, loaded by sdjax, outputs compared in float32: SDXL's context
(both encoders' penultimate states side by side, (2, 77, 2048)), its pooled ``text_embeds`` (2, 1280), and the
UNet's ε̂ at a 32×32 latent with the added conditioning (a random context). The VAE is SD's architecture,
checked at full size by test_convert_full.py.

Memory: the UNet alone is 10.3 GB in float32. The reference is built, run and saved in a child process
(:func:`reference`), so its memory goes back to the system before sdjax loads the folder: PyTorch's freed
blocks stay in this process otherwise, and the two 10 GB copies do not fit a 24 GB machine. 14 GB of disk.

Tolerance 1e-4 relative, as for full-size SD1.5 (test_convert_full.py explains why it is above the tiny
models' 1e-5). Measured on the 2-core, 24 GiB CPU machine (2026-12-05): 209 s, peak resident memory 20.8 GB;
text_embeds 1.5e-6, context 1.4e-6, UNet 2.8e-6.
"""

import json
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import convert
from tests.helpers import rel_err

pytestmark = pytest.mark.slow
RTOL = 1e-4

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPTS = ["a photograph of an astronaut riding a horse", ""]

# The child process: build the reference networks at SDXL's shapes with random weights, run them on fixed
# inputs, save them as diffusers folders and their outputs as reference.npz.
REFERENCE = textwrap.dedent(
    """
    import dataclasses, json, sys
    from pathlib import Path
    import numpy as np, torch, diffusers, transformers
    from sdjax.models import CLIPTextConfig, UNetConfig
    from sdjax.tokenizer import CLIPTokenizer

    folder, prompts = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.manual_seed(0)
    out = {}
    config = {k: v for k, v in UNetConfig.sdxl().to_diffusers().items() if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel(**config).eval()
    out["unet_parameters"] = np.array(sum(p.numel() for p in unet.parameters()))
    inputs = np.load(folder / "inputs.npz")
    x, t, context, text_embeds, time_ids = (torch.from_numpy(inputs[k]) for k in ("x", "t", "context",
                                                                                   "text_embeds", "time_ids"))
    with torch.no_grad():
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        eps = unet(x.permute(0, 3, 1, 2), t, context, added_cond_kwargs=added).sample
        out["unet"] = eps.permute(0, 2, 3, 1).numpy()
    unet.save_pretrained(folder / "unet")
    del unet
    for k, (name, cls, cfg, pad) in enumerate((
        ("text_encoder", transformers.CLIPTextModel, CLIPTextConfig.sd1(), "<|endoftext|>"),
        ("text_encoder_2", transformers.CLIPTextModelWithProjection, CLIPTextConfig.sdxl_bigg(), "!"),
    )):
        model = cls(transformers.CLIPTextConfig(**dataclasses.asdict(cfg))).eval()
        ids = torch.from_numpy(np.asarray(CLIPTokenizer.from_bpe_file(pad_token=pad)(prompts)))
        with torch.no_grad():
            result = model(ids, output_hidden_states=True)
        out[f"context_{k}"] = result.hidden_states[-2].numpy()
        if k:
            out["text_embeds"] = result.text_embeds.numpy()
        model.save_pretrained(folder / name)
    np.savez(folder / "reference.npz", **out)
    """
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(folder, the reference's outputs), made by a child process (module docstring)."""
    folder = tmp_path_factory.mktemp("sdxl")
    rng = np.random.default_rng(0)
    np.savez(
        folder / "inputs.npz",
        x=rng.standard_normal((2, 32, 32, 4)).astype(np.float32),
        t=np.array([999, 10]),
        context=rng.standard_normal((2, 77, 2048)).astype(np.float32),
        text_embeds=rng.standard_normal((2, 1280)).astype(np.float32),
        time_ids=np.array([[1024, 1024, 0, 0, 1024, 1024]] * 2, np.float32),
    )
    start = time.time()
    subprocess.run([sys.executable, "-c", REFERENCE, str(folder), json.dumps(PROMPTS)], check=True)
    print(f"\nbuilt, ran and saved the SDXL-shaped reference in {time.time() - start:.0f} s (a child process)")
    return folder, dict(np.load(folder / "reference.npz")), dict(np.load(folder / "inputs.npz"))


def test_sdxl_full_size_parity(reference):
    from sdjax.tokenizer import CLIPTokenizer

    folder, want, inputs = reference
    assert int(want["unet_parameters"]) == 2_567_463_684
    errors, contexts = {}, []
    for k, (name, pad) in enumerate((("text_encoder", "<|endoftext|>"), ("text_encoder_2", "!"))):
        model = convert.load_text_encoder(folder / name)
        ids = jnp.asarray(CLIPTokenizer.from_bpe_file(pad_token=pad)(PROMPTS))
        context, out = nnx.jit(lambda m, i: (m.encode(i, clip_skip=1, final_norm=False), m(i)))(model, ids)
        contexts.append(np.asarray(context))
        if k:
            errors["text_embeds (bigG)"] = rel_err(out.text_embeds, want["text_embeds"])
        del model, out
    errors["context (ViT-L + bigG)"] = rel_err(
        np.concatenate(contexts, axis=-1), np.concatenate([want["context_0"], want["context_1"]], axis=-1)
    )

    start = time.time()
    unet = convert.load_unet(folder / "unet")
    print(f"sdjax load_unet: {time.time() - start:.1f} s")
    # jax.jit of the merged module (nnx.jit would also return the 10 GB of parameters, as a second copy)
    graphdef, state = nnx.split(unet)
    del unet
    step = jax.jit(
        lambda s, x, t, c, e, i: nnx.merge(graphdef, s)(x, t, c, added_cond={"text_embeds": e, "time_ids": i})
    )
    start = time.time()
    names = ("x", "t", "context", "text_embeds", "time_ids")
    ours = np.asarray(step(state, *(jnp.asarray(inputs[n]) for n in names)))
    print(f"sdjax UNet, batch 2 at 32×32 (compile + run): {time.time() - start:.1f} s")
    errors["unet"] = rel_err(ours, want["unet"])
    print("max relative errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < RTOL, errors
