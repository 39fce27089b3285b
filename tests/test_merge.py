"""Checkpoint merging (sdjax.merge) against sd-mecha, the merging library people script merges with.

The models: a miniature SD1 — SD1.5's exact architecture (4 UNet levels of 2 layers, cross-attention in three,
a 4-level VAE, a 12-layer CLIP) at widths of 16–64 — so its CompVis single file has exactly the 1,130 tensor
names of sd-mecha's "sd1-ldm" config, and sd-mecha's own block mapping (its "sd1-supermerger_blocks" → "sd1-ldm"
conversion) applies unchanged. B and C are A plus independent noise (fine-tunes of one base).

Tolerance: none — every tensor must be bit for bit sd-mecha's (float32 in, float32 out). Both compute in float32
with one fused multiply-add, as torch.lerp and torch.addcmul do; the naive (1 − α)a + αb differs from torch in
about a quarter of the elements by one ulp, so equality is a real check of the formula. The diffusers-folder and
sdjax-folder merges are checked against the CompVis one (their tensors are the same numbers under other names
and, for sdjax, transposed), which checks their block mapping against sd-mecha's too.
"""

import dataclasses
import functools

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from sdjax import cli, convert, merge
from sdjax.components import Components
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
from sdjax.models.unet import UNet2D
from sdjax.models.unet_config import UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.schedulers import NoiseSchedule
from sdjax.speed import CONFIGS, SD_SCHEDULER, random_components, random_init
from sdjax.tokenizer import CLIPTokenizer

torch = pytest.importorskip("torch")
sd_mecha = pytest.importorskip("sd_mecha")

BLOCKS = merge.block_names(12)
# one distinct α per block, so that a tensor in the wrong block shows
WEIGHTS = [round(0.04 * i, 2) for i in range(len(BLOCKS))]


# SD1.5's architecture at toy widths (every channel change of SD1.5 kept, so the same shortcut convs exist)
UNET = dataclasses.replace(
    UNetConfig.sd15(), block_out_channels=(16, 32, 64, 64), cross_attention_dim=32, num_attention_heads=4,
    norm_num_groups=8, sample_size=8,
)  # fmt: skip
VAE = dataclasses.replace(VAEConfig.sd(), block_out_channels=(8, 16, 32, 32), norm_num_groups=4)
TEXT = dataclasses.replace(CLIPTextConfig.sd1(), hidden_size=32, intermediate_size=64, num_attention_heads=4)


def mini_sd1() -> Components:
    rng = np.random.default_rng(0)
    return Components(
        unet=random_init(UNet2D, UNET, rng),
        vae=random_init(AutoencoderKL, VAE, rng),
        text_encoder=random_init(CLIPTextModel, TEXT, rng),
        tokenizer=CLIPTokenizer.from_bpe_file(),
        schedule=NoiseSchedule.from_diffusers_config(SD_SCHEDULER),
        scheduler_config=dict(SD_SCHEDULER),
    )


def load(path) -> Components:
    """A merged model read back (a CompVis file needs the toy configs: it does not record them)."""
    return convert.load(path, unet=UNET, vae=VAE, text_encoder=TEXT) if str(path).endswith(".safetensors") else (
        convert.load(path))  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"A", "B", "C"}: CompVis single files; B and C are A + 0.1·N(0, 1) noise (different draws)."""
    d = tmp_path_factory.mktemp("merge")
    paths = {"A": convert.save(mini_sd1(), d / "a.safetensors", layout="compvis")}
    a = load_file(paths["A"])
    for i, name in enumerate("BC"):
        rng = np.random.default_rng(i + 1)
        other = {k: (v + np.float32(0.1) * rng.standard_normal(v.shape, np.float32) if v.dtype.kind == "f" else v)
                 for k, v in a.items()}  # fmt: skip
        save_file(other, str(d / f"{name.lower()}.safetensors"))
        paths[name] = d / f"{name.lower()}.safetensors"
    return paths


def mecha(recipe) -> dict[str, np.ndarray]:
    quiet = functools.partial(tqdm, disable=True)
    out = sd_mecha.merge(recipe, output_dtype=torch.float32, threads=1, tqdm=quiet)
    return {k: v.numpy() for k, v in out.items() if k != "__metadata__"}


def mecha_model(path):
    return sd_mecha.model(str(path), config="sd1-ldm")


def mecha_blocks(weights: list[float]):
    """sd-mecha's per-block α: a literal in its SuperMerger-blocks config converted to the sd1-ldm keys."""
    literal = sd_mecha.literal({n: torch.tensor(w) for n, w in zip(BLOCKS, weights, strict=True)},
                               config="sd1-supermerger_blocks")  # fmt: skip
    return sd_mecha.convert(literal, "sd1-ldm")


def assert_identical(ours_path, theirs: dict[str, np.ndarray]):
    ours = load_file(ours_path)
    assert set(ours) == set(theirs)
    differ = [k for k in theirs if not np.array_equal(ours[k], theirs[k])]
    assert not differ, f"{len(differ)} tensors differ from sd-mecha's, e.g. {differ[:3]}"


@pytest.mark.slow  # the block-weighted test below runs the same formula with 26 values of α (7 s)
def test_weighted_sum_equals_sd_mecha(files, tmp_path, alpha=0.3):
    out = merge.merge([files["A"], files["B"]], tmp_path / "m.safetensors", alpha=alpha, progress=False)
    assert_identical(out, mecha(sd_mecha.weighted_sum(mecha_model(files["A"]), mecha_model(files["B"]), alpha=alpha)))


def test_weighted_sum_ends_are_the_models(files, tmp_path):
    a, b = load_file(files["A"]), load_file(files["B"])
    for alpha, expected in ((0.0, a), (1.0, b)):
        out = load_file(merge.merge([files["A"], files["B"]], tmp_path / "m.safetensors", alpha=alpha, progress=False))
        assert all(np.array_equal(out[k], expected[k]) for k in a)


def test_add_difference_equals_sd_mecha(files, tmp_path):
    out = merge.merge([files["A"], files["B"], files["C"]], tmp_path / "m.safetensors", alpha=0.7, progress=False)
    A, B, C = (mecha_model(files[k]) for k in "ABC")
    assert_identical(out, mecha(sd_mecha.add_difference(A, B, C, alpha=0.7)))


def test_block_weighted_sum_equals_sd_mecha(files, tmp_path):
    out = merge.merge([files["A"], files["B"]], tmp_path / "m.safetensors", block_weights=WEIGHTS, progress=False)
    theirs = mecha(sd_mecha.weighted_sum(mecha_model(files["A"]), mecha_model(files["B"]), alpha=mecha_blocks(WEIGHTS)))
    assert_identical(out, theirs)
    # 25 weights (no BASE) with alpha as BASE's: the same merge, written the web UI's way
    text = ",".join(str(w) for w in WEIGHTS[1:])
    again = merge.merge([files["A"], files["B"]], tmp_path / "m25.safetensors", alpha=WEIGHTS[0], block_weights=text,
                        progress=False)  # fmt: skip
    assert_identical(again, theirs)


@pytest.mark.slow  # the same per-block α as the weighted sum's, in the add-difference formula checked above (10 s)
def test_block_weighted_add_difference_equals_sd_mecha(files, tmp_path):
    weights = WEIGHTS[::-1]
    out = merge.merge([files[k] for k in "ABC"], tmp_path / "m.safetensors", block_weights=weights, progress=False)
    A, B, C = (mecha_model(files[k]) for k in "ABC")
    assert_identical(out, mecha(sd_mecha.add_difference(A, B, C, alpha=mecha_blocks(weights))))


def test_block_of_names_every_unet_tensor_of_sd1():
    """Every UNet tensor of SD1.5's architecture, by its diffusers name, lands in the block of its CompVis name
    (the mapping sd-mecha's tests above confirm)."""
    from sdjax import compvis

    names = convert.state_dict_names(convert.abstract(UNet2D, UNET))
    modules = compvis._unet_modules(UNET)
    seen = set()
    for name in names:
        theirs = merge.block_of(compvis.UNET_PREFIX + compvis._rename(name, modules))
        assert merge.block_of("unet/" + name) == theirs, name
        seen.add(theirs)
    assert seen == set(BLOCKS)  # all 26 used (BASE: the time embedding)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """sdjax's tiny random SD (2 UNet levels of 1 layer: blocks IN00–IN03, M00, OUT00–OUT03) as two CompVis files."""
    d = tmp_path_factory.mktemp("tiny")
    return [convert.save(random_components("tiny", seed=i), d / f"{i}.safetensors", layout="compvis") for i in (1, 2)]


@pytest.mark.parametrize("layout", ["diffusers", pytest.param("sdjax", marks=pytest.mark.slow)])
def test_folders_merge_as_single_files(tiny, tmp_path, layout):
    """The same block-weighted merge of diffusers (or sdjax) folders holds exactly the single-file merge's numbers
    (under other names, and transposed for sdjax), so their block mapping is the CompVis one; the output folder is
    a complete model of that layout (configs and tokenizer copied from A)."""
    tiny_load = functools.partial(convert.load, **dict(zip(("unet", "vae", "text_encoder"), CONFIGS["tiny"])))
    weights = [0.1 * i for i in range(10)]  # BASE, IN00–IN03, M00, OUT00–OUT03
    folders = [convert.save(tiny_load(f), tmp_path / f"{i}-{layout}", layout=layout) for i, f in enumerate(tiny)]
    single = tiny_load(merge.merge(tiny, tmp_path / "m.safetensors", block_weights=weights, progress=False))
    merged = convert.load(merge.merge(folders, tmp_path / "merged", block_weights=weights, progress=False))
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = convert.state_dict(getattr(merged, part)), convert.state_dict(getattr(single, part))
        assert all(np.array_equal(ours[k], theirs[k]) for k in theirs), part


def test_output_dtype_and_streaming_writer(files, tmp_path):
    out = merge.merge([files["A"], files["B"]], tmp_path / "m.safetensors", alpha=0.5, dtype="float16", progress=False)
    half = load_file(out)
    full = load_file(merge.merge([files["A"], files["B"]], tmp_path / "f.safetensors", alpha=0.5, progress=False))
    ints = [k for k, v in full.items() if v.dtype.kind != "f"]
    for k, v in half.items():
        assert v.dtype == (full[k].dtype if k in ints else np.float16)
        np.testing.assert_array_equal(v, full[k].astype(v.dtype))


def test_bake_lora(tiny, tmp_path):
    """A LoRA baked into the file: loading the output gives the weights W + s Δ that the live adapters fuse to."""
    import jax
    from flax import nnx

    from sdjax import lora

    folder = convert.save(random_components("tiny"), tmp_path / "a", layout="sdjax")
    sd = convert.load(folder)
    names = lora.add_lora(sd.unet, lora.LoRAConfig(rank=2, alpha=1.0), rngs=nnx.Rngs(0))
    adapters = nnx.state(sd.unet, lora.LoRAParam)  # B starts at 0: give the adapters something to add
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(sd.unet, jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    file = lora.save_lora(tmp_path / "l.safetensors", unet=sd.unet, format="kohya")
    out = merge.bake_lora(folder, [(file, 0.6)], tmp_path / "baked")
    lora.set_lora_scale(sd.unet, 0.6)
    lora.fuse_lora(sd.unet)
    lora.remove_lora(sd.unet)
    baked, expected = convert.state_dict(convert.load(out).unet), convert.state_dict(sd.unet)
    base = convert.state_dict(convert.load(folder).unet)
    assert max(float(np.max(np.abs(baked[k] - expected[k]))) for k in expected) < 1e-6
    changed = {k for k in base if not np.array_equal(baked[k], base[k])}
    assert changed == {f"{n}.weight" for n in names}  # exactly the adapted layers' weights, and all of them


def test_cli_merge(files, tmp_path):
    out = tmp_path / "cli.safetensors"
    blocks = ",".join(str(w) for w in WEIGHTS)
    assert cli.main(["merge", str(files["A"]), str(files["B"]), "-o", str(out), "--blocks", blocks]) == 0
    ref = merge.merge([files["A"], files["B"]], tmp_path / "ref.safetensors", block_weights=WEIGHTS, progress=False)
    a, b = load_file(out), load_file(ref)
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_errors(files, tiny, tmp_path, capsys):
    a = load_file(files["A"])
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    save_file({k: v for k, v in a.items() if k != key}, str(tmp_path / "missing.safetensors"))
    save_file({**a, key: np.zeros((3, 3), np.float32)}, str(tmp_path / "shape.safetensors"))
    raw = files["A"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    folder = convert.save(random_components("tiny"), tmp_path / "folder", layout="diffusers")
    out = tmp_path / "o.safetensors"
    cases = [
        ([files["A"], tmp_path / "missing.safetensors"], {}, "lacks 1 tensors"),
        ([files["A"], tmp_path / "shape.safetensors"], {}, "not the same architecture"),
        ([files["A"], tmp_path / "cut.safetensors"], {}, "truncated"),
        ([files["A"], folder], {}, "merge models of one layout"),
        ([files["A"], tmp_path / "nope.safetensors"], {}, "no such model"),
        ([files["A"]], {}, "merge two"),
        ([files["A"], files["B"]], {"block_weights": [0.5] * 24}, "give 25"),
        ([files["A"], files["B"]], {"block_weights": "0.5,x"}, "comma-separated numbers"),
        ([files["A"], files["B"]], {"dtype": "int8"}, "dtype"),
    ]
    for models, kwargs, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            merge.merge(models, out, progress=False, **kwargs)
    with pytest.raises(ValueError, match="one .safetensors file"):
        merge.merge([files["A"], files["B"]], tmp_path / "o.ckpt", progress=False)
    assert cli.main(["merge", str(files["A"]), str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2
    assert "lacks 1 tensors" in capsys.readouterr().err
