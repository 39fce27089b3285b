"""CompVis single files: the original ``ldm`` layout of SD1.x/2.x ``.ckpt``/``.safetensors`` checkpoints.

One file holds all three networks under prefixes, with the original latent-diffusion code's names:

    model.diffusion_model.*        the UNet:  input_blocks / middle_block / output_blocks
    first_stage_model.*            the VAE:   encoder.down[i].block[j] / mid.block_1 / decoder.up[n-1-i] ...
    cond_stage_model.transformer.* SD1's text encoder (transformers names)
    cond_stage_model.model.*       SD2's text encoder (OpenCLIP names; q, k, v stored as one in_proj)

SDXL's files (Stability's ``sgm`` code) keep the UNet and VAE names (the UNet adds ``label_emb``, the
added-conditioning MLP) and hold two text encoders under ``conditioner.embedders``:

    conditioner.embedders.0.transformer.*   CLIP ViT-L (transformers names, as SD1's)
    conditioner.embedders.1.model.*         OpenCLIP bigG (OpenCLIP names, as SD2's, all 32 layers, and
                                            ``text_projection`` stored as the (D, P) matrix x is multiplied by)

Below, each network's names are derived from its config, as a map from module paths in diffusers'
names to module paths in CompVis names; the leaves (weight, bias) are the same on both sides.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from sdjax.components import Components
from sdjax.convert import abstract, load_state_dict, read_state_dict, state_dict, state_dict_names
from sdjax.io import listing
from sdjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.controlnet import ControlNet, ControlNetConfig
from sdjax.models.unet import UNet2D, UNetConfig
from sdjax.models.vae import AutoencoderKL, VAEConfig
from sdjax.schedulers import NoiseSchedule
from sdjax.tokenizer import CLIPTokenizer

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT_PREFIX, SD2_TEXT_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_TEXT_PREFIX, SDXL_TEXT_2_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
# stabilityai/stable-diffusion-xl-base-1.0's scheduler (single files do not record one)
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
                  "use_karras_sigmas": False, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "clip_sample": False, "sample_max_value": 1.0, "trained_betas": None}  # fmt: skip

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_modules(cfg: UNetConfig) -> dict[str, tuple[str, dict]]:
    """diffusers module path → (CompVis module path, renames inside it) for a UNet of config ``cfg``.

    CompVis numbers the UNet's layers as one flat list per half: ``input_blocks[0]`` is conv_in, then
    each level contributes L = layers_per_block (resnet[, attention]) entries and one downsampler;
    ``output_blocks`` has L + 1 entries per level, the last also holding the upsampler.
    """
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    attends = lambda kind: "Attn" in kind  # noqa: E731
    m = {"time_embedding.linear_1": ("time_embed.0", {}), "time_embedding.linear_2": ("time_embed.2", {}),
         "conv_in": ("input_blocks.0.0", {}), "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {})}  # fmt: skip
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", _UNET_RESNET)
            if attends(kind):
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", {})
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (L + 1)}.0.op", {})
    if cfg.addition_embed_type == "text_time":  # SDXL's added conditioning
        m |= {"add_embedding.linear_1": ("label_emb.0.0", {}), "add_embedding.linear_2": ("label_emb.0.2", {})}
    m["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET)
    m["mid_block.attentions.0"] = ("middle_block.1", {})
    m["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET)
    for i, kind in enumerate(cfg.up_block_types):
        for j in range(L + 1):
            k = i * (L + 1) + j
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", _UNET_RESNET)
            if attends(kind):
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", {})
        if i < n - 1:
            m[f"up_blocks.{i}.upsamplers.0.conv"] = (
                f"output_blocks.{i * (L + 1) + L}.{2 if attends(kind) else 1}.conv",
                {},
            )
    return m


def _vae_modules(cfg: VAEConfig) -> dict[str, tuple[str, dict]]:
    """diffusers module path → (CompVis module path, renames inside it) for an AutoencoderKL.

    The CompVis decoder numbers its levels from the lowest resolution up (``up[n-1]`` runs first),
    diffusers in the order they run: diffusers ``up_blocks[i]`` is CompVis ``up[n-1-i]``.
    """
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    m = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        m |= {f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
              f"{part}.conv_norm_out": (f"{part}.norm_out", {}),
              f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", _VAE_RESNET),
              f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", _VAE_ATTENTION),
              f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", _VAE_RESNET)}  # fmt: skip
    for i in range(n):
        for j in range(L):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        for j in range(L + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET)
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", {})
    return m


def _rename(name: str, modules: dict[str, tuple[str, dict]]) -> str:
    """Translate one diffusers tensor name through a module map (longest matching module path wins)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in modules:
            target, inner = modules[head]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{target}.{rest}"
    return name  # same name on both sides (the transformer blocks inside attentions)


_OPENCLIP_RENAMES = (
    ("encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)


def _openclip_name(name: str) -> str:
    """transformers CLIP text name → OpenCLIP name (SD2's text encoder), except the q/k/v projections."""
    name = name.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    if name in fixed:
        return fixed[name]
    for old, new in _OPENCLIP_RENAMES:
        name = name.replace(old, new)
    return name


def to_compvis(sd: Components) -> dict[str, np.ndarray]:
    """All of ``sd``'s weights in one CompVis-layout state dict (what a single-file checkpoint holds)."""
    out = {}
    unet_map, vae_map = _unet_modules(sd.unet.config), _vae_modules(sd.vae.config)
    for name, w in state_dict(sd.unet).items():
        out[UNET_PREFIX + _rename(name, unet_map)] = w
    for name, w in state_dict(sd.vae).items():
        compvis = _rename(name, vae_map)
        if ".mid.attn_1." in compvis and w.ndim == 2:
            w = w[:, :, None, None]  # CompVis stores the VAE attention's projections as 1×1 convolutions
        out[VAE_PREFIX + compvis] = w
    if sd.version == "sd1":
        out |= _hf_text(sd.text_encoder, SD1_TEXT_PREFIX)
    elif sd.version == "sd2":
        out |= _openclip_text(sd.text_encoder, SD2_TEXT_PREFIX)
    else:
        out |= _hf_text(sd.text_encoder, SDXL_TEXT_PREFIX) | _openclip_text(sd.text_encoder_2, SDXL_TEXT_2_PREFIX)
    return out


def _hf_text(model: CLIPTextModel, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}text_model.{k}": w for k, w in state_dict(model).items()}


def _openclip_text(model: CLIPTextModel, prefix: str) -> dict[str, np.ndarray]:
    text, out = state_dict(model), {}
    for name, w in text.items():
        if ".self_attn.q_proj." in name:  # OpenCLIP: in_proj = [W_q; W_k; W_v] stacked on the output axis
            leaf = name.rsplit(".", 1)[1]
            qkv = [text[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"{prefix}{_openclip_name(name.split('.self_attn.')[0])}.attn.in_proj_{leaf}"] = np.concatenate(qkv)
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = w.T  # OpenCLIP multiplies: x @ P
        elif "_proj." not in name or "out_proj" in name:
            out[prefix + _openclip_name(name)] = w
    return out


def _from_compvis(ckpt: dict[str, np.ndarray], unet_cfg: UNetConfig, vae_cfg: VAEConfig, text_cfg):
    """Split a CompVis state dict into diffusers-named state dicts for the networks (``text_cfg``: SDXL's
    two text configs as a pair).

    Returns (unet, vae, text, text_2, missing), text_2 None but for SDXL: ``missing`` lists the CompVis
    names the networks need and the file lacks. Tensors the networks do not use (EMA copies, the SD2 text
    tower's last layer and projection, CLIP's logit scale, training-time buffers such as ``alphas_cumprod``
    ...) are left out.
    """
    missing = []

    def take(key: str):
        if key not in ckpt:
            missing.append(key)
        return ckpt.get(key)

    unet_map, vae_map = _unet_modules(unet_cfg), _vae_modules(vae_cfg)
    unet = {d: take(UNET_PREFIX + _rename(d, unet_map)) for d in _names(UNet2D, unet_cfg)}
    vae = {}
    for d in _names(AutoencoderKL, vae_cfg):
        c = VAE_PREFIX + _rename(d, vae_map)
        w = take(c)
        vae[d] = w[:, :, 0, 0] if w is not None and ".mid.attn_1." in c and w.ndim == 4 else w
    sdxl = any(k.startswith(SDXL_TEXT_2_PREFIX) for k in ckpt)
    if sdxl:
        text = _text_from_compvis(ckpt, SDXL_TEXT_PREFIX, CLIPTextModel, text_cfg[0], take)
        text_2 = _text_from_compvis(ckpt, SDXL_TEXT_2_PREFIX, CLIPTextModelWithProjection, text_cfg[1], take)
    elif any(k.startswith(SD2_TEXT_PREFIX) for k in ckpt):
        text, text_2 = _text_from_compvis(ckpt, SD2_TEXT_PREFIX, CLIPTextModel, text_cfg, take), None
    else:
        text, text_2 = _text_from_compvis(ckpt, SD1_TEXT_PREFIX, CLIPTextModel, text_cfg, take), None
    drop_missing = lambda sd: None if sd is None else {k: v for k, v in sd.items() if v is not None}  # noqa: E731
    return drop_missing(unet), drop_missing(vae), drop_missing(text), drop_missing(text_2), missing


def _text_from_compvis(ckpt, prefix: str, cls, cfg: CLIPTextConfig, take) -> dict:
    """One text encoder's diffusers-named tensors from under ``prefix``: OpenCLIP names (q, k, v a third of
    the layer's in_proj each; the projection transposed) or transformers names (older SD1 files have no
    "text_model." level under the prefix)."""
    openclip, text = prefix.endswith(".model."), {}
    for d in _names(cls, cfg):
        if openclip and "_proj." in d and "out_proj" not in d and "text_projection" not in d:
            layer, rest = d.split(".self_attn.")
            proj, leaf = rest.split(".")
            w = take(f"{prefix}{_openclip_name(layer)}.attn.in_proj_{leaf}")
            if w is not None:
                third = w.shape[0] // 3
                text[d] = w[("q_proj", "k_proj", "v_proj").index(proj) * third :][:third]
        elif d == "text_projection.weight":
            w = take(prefix + "text_projection")
            text[d] = None if w is None else w.T
        elif openclip:
            text[d] = take(prefix + _openclip_name(d))
        else:
            old = prefix + d
            text[d] = ckpt[old] if old in ckpt else take(f"{prefix}text_model.{d}")
    return text


def detect_version(ckpt: dict[str, np.ndarray], source: str = "checkpoint") -> str:
    """ "sd1", "sd2" or "sdxl" from the tensors of a CompVis state dict; ValueError for anything else."""
    if not any(k.startswith(UNET_PREFIX) for k in ckpt):
        prefixes = sorted({k.split(".")[0] for k in ckpt})
        raise ValueError(
            f"{source} is not a Stable Diffusion 1.x/2.x/XL single-file checkpoint: it has no {UNET_PREFIX}* "
            f"tensors (top-level names: {listing(prefixes)}). LoRA and VAE-only files are different formats."
        )
    if any(k.startswith(SDXL_TEXT_2_PREFIX) for k in ckpt):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in ckpt):
        raise ValueError(
            f"{source} is SDXL's refiner (one OpenCLIP text encoder and an aesthetic-score conditioning); sdjax "
            "runs SDXL base"
        )
    if any(k.startswith(SD2_TEXT_PREFIX) for k in ckpt):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in ckpt):
        return "sd1"
    raise ValueError(f"{source} has a UNet but no cond_stage_model.* text encoder; it is not a full SD1.x/2.x file")


def unet_in_channels(ckpt: dict[str, np.ndarray], default: int = 4) -> int:
    """The input channels of a CompVis state dict's UNet, read off its first convolution
    (``input_blocks.0.0.weight``, (out, in, 3, 3)): 4 for the latents alone, 9 for an inpainting model
    (latents, mask, masked-image latents). ``default`` when the file lacks that tensor."""
    weight = ckpt.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return default if weight is None or weight.ndim != 4 else int(weight.shape[1])


def load_single_file(
    path: str | os.PathLike,
    *,
    unet: UNetConfig | None = None,
    vae: VAEConfig | None = None,
    text_encoder: CLIPTextConfig | None = None,
    schedule: NoiseSchedule | None = None,
    tokenizer: CLIPTokenizer | None = None,
    text_encoder_2: CLIPTextConfig | None = None,
    dtype=None,
) -> Components:
    """A CompVis single-file checkpoint (``.safetensors``, or ``.ckpt`` read with weights_only=True).

    The file says whether it is SD1, SD2 (OpenCLIP names under ``cond_stage_model.model``) or SDXL (two
    text encoders under ``conditioner.embedders``); the networks' configs default to that version's
    (``UNetConfig.sd15()``/``sd2()``/``sdxl()`` ...), and any of them can be given instead (tiny test
    models, or a fine-tune of another shape). ``dtype``: the networks' parameters (default float32), each
    tensor cast as it is loaded. The UNet's input
    channels are the file's whatever the config (:func:`unet_in_channels`: 9 for an inpainting model).
    The file does not say what the UNet predicts: SD1.x, SD2 512-base and SD2 inpainting predict ε,
    SD2 768-v predicts v — the default for SD2's 4-channel UNets here; pass
    ``schedule=NoiseSchedule.sd15()`` for an SD2 ε-model.
    """
    ckpt = read_state_dict(path, float32=False)  # as stored: a float16 file stays half the size until cast
    version = detect_version(ckpt, str(path))
    sd2, sdxl = version == "sd2", version == "sdxl"
    unet = unet or {"sd1": UNetConfig.sd15, "sd2": UNetConfig.sd2, "sdxl": UNetConfig.sdxl}[version]()
    unet = dataclasses.replace(unet, in_channels=unet_in_channels(ckpt, default=unet.in_channels))
    vae = vae or (VAEConfig.sdxl() if sdxl else VAEConfig.sd())
    if unet.in_channels == vae.latent_channels + 1:
        raise ValueError(
            f"{path} is an SD 2 depth-to-image model (its UNet takes a depth map as a 5th input channel): sdjax "
            "does not implement depth conditioning; it runs SD 1.x/2.x text-to-image, img2img and inpainting files"
        )
    text_encoder = text_encoder or (CLIPTextConfig.sd2() if sd2 else CLIPTextConfig.sd1())
    v_prediction = sd2 and unet.in_channels == vae.latent_channels
    schedule = schedule or NoiseSchedule.sd15(prediction_type="v_prediction" if v_prediction else "epsilon")
    tokenizer = tokenizer or CLIPTokenizer.from_bpe_file(pad_token="!" if sd2 else "<|endoftext|>")
    text_encoder_2 = (text_encoder_2 or CLIPTextConfig.sdxl_bigg()) if sdxl else None
    texts = (text_encoder, text_encoder_2) if sdxl else text_encoder
    unet_sd, vae_sd, text_sd, text_2_sd, missing = _from_compvis(ckpt, unet, vae, texts)
    del ckpt  # the networks' dicts now hold the only references: each tensor is freed once converted
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} tensors a {version.upper()} model with these configs needs "
            f"({listing(missing)}). Is the file complete (not truncated, not a pruned/partial export), and are "
            "the configs right for it?"
        )
    models = {}
    for name, cls, config, weights in (
        ("unet", UNet2D, unet, unet_sd),
        ("vae", AutoencoderKL, vae, vae_sd),
        ("text_encoder", CLIPTextModel, text_encoder, text_sd),
        ("text_encoder_2", CLIPTextModelWithProjection, text_encoder_2, text_2_sd),
    ):
        if config is not None:
            models[name] = abstract(cls, config, dtype)
            load_state_dict(models[name], weights, source=f"{path} ({name})", consume=True)
    if not sdxl:
        return Components(**models, tokenizer=tokenizer, schedule=schedule)
    return Components(
        **models, tokenizer=tokenizer, schedule=schedule, scheduler_config=SDXL_SCHEDULER,
        tokenizer_2=CLIPTokenizer.from_bpe_file(pad_token="!"), force_zeros_for_empty_prompt=True,
    )  # fmt: skip


def save_single_file(sd: Components, path: str | os.PathLike) -> Path:
    """Write ``sd`` as a CompVis single-file ``.safetensors`` (the layout of SD1.x/2.x/XL release files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: sdjax writes single files as .safetensors only (no pickles); use that suffix")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in to_compvis(sd).items()}, str(path))
    return path


CONTROLNET_PREFIX = "control_model."


def _controlnet_modules(cfg: ControlNetConfig) -> dict[str, tuple[str, dict]]:
    """diffusers module path → (original ControlNet module path, renames) for a ControlNetModel: the UNet
    encoder's CompVis names, plus ``input_hint_block`` (the condition embedding, a Sequential of convs and
    SiLUs: convs at 0, 2, 4, …), ``zero_convs.{i}.0`` and ``middle_block_out.0``."""
    m = {k: v for k, v in _unet_modules(cfg.unet).items() if not k.startswith(("up_blocks", "conv_out", "conv_norm"))}
    n_blocks = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)
    m["controlnet_cond_embedding.conv_in"] = ("input_hint_block.0", {})
    m |= {f"controlnet_cond_embedding.blocks.{k}": (f"input_hint_block.{2 * (k + 1)}", {}) for k in range(n_blocks)}
    m["controlnet_cond_embedding.conv_out"] = (f"input_hint_block.{2 * (n_blocks + 1)}", {})
    m |= {f"controlnet_down_blocks.{i}": (f"zero_convs.{i}.0", {}) for i in range(len(_skips(cfg)))}
    m["controlnet_mid_block"] = ("middle_block_out.0", {})
    return m


def _skips(cfg: ControlNetConfig) -> list[int]:
    L, n = cfg.unet.layers_per_block, len(cfg.unet.block_out_channels)
    return list(range(1 + n * L + (n - 1)))


def controlnet_to_single_file(model: ControlNet) -> dict[str, np.ndarray]:
    """A ControlNet's tensors under the original release's names (``control_model.`` + CompVis names)."""
    modules = _controlnet_modules(model.controlnet_config)
    return {CONTROLNET_PREFIX + _rename(k, modules): v for k, v in state_dict(model).items()}


def load_controlnet_single_file(
    path: str | os.PathLike, *, unet: UNetConfig | None = None, dtype=None, **options
) -> ControlNet:
    """A ControlNet from one file in the original release's layout (``control_model.input_blocks…``,
    ``input_hint_block``, ``zero_convs``, ``middle_block_out``; the prefix may be absent). The file does
    not carry a config: the encoder is ``unet`` (default SD1.5's UNet, in_channels 4), the rest
    ``ControlNetConfig``'s defaults or ``options``."""
    ckpt = read_state_dict(path, float32=False)
    if not any(k.startswith(CONTROLNET_PREFIX) for k in ckpt):
        ckpt = {CONTROLNET_PREFIX + k: v for k, v in ckpt.items()}
    if CONTROLNET_PREFIX + "input_hint_block.0.weight" not in ckpt:
        raise ValueError(
            f"{path} is not a ControlNet file: it has no input_hint_block (the condition image's encoder). "
            "Is it a Stable Diffusion checkpoint or a LoRA? Load those with sdjax.convert.load / the LoRA loaders"
        )
    cfg = ControlNetConfig(dataclasses.replace(unet or UNetConfig.sd15(), in_channels=4), **options)
    modules = _controlnet_modules(cfg)
    model = abstract(ControlNet, cfg, dtype)
    names = state_dict_names(model)
    missing = [n for n in names if CONTROLNET_PREFIX + _rename(n, modules) not in ckpt]
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} tensors a ControlNet with this encoder config needs ({listing(missing)}). "
            "Is the file complete, and is unet= the config of the model it was trained for (SD1.5 by default)?"
        )
    weights = {n: ckpt.pop(CONTROLNET_PREFIX + _rename(n, modules)) for n in names}
    load_state_dict(model, weights, source=str(path), consume=True)
    return model


def _names(cls, config) -> list[str]:
    return state_dict_names(abstract(cls, config))
