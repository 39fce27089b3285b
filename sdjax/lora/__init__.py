"""LoRA: low-rank adapters for fine-tuning and for loading the LoRA files people share.

Fine-tuning all 860 M weights of SD's UNet to teach it one subject or style is costly, and the result
is a whole new checkpoint. LoRA (Hu et al. 2021, arXiv:2106.09685) freezes every weight W (in, out)
and learns a low-rank update beside it, in the layers that matter most (the attention projections):

    y = x W + b + s · (α / r) · (dropout(x) A) B          A (in, r), B (r, out), r ≪ min(in, out)

A starts random, B at zero, so a new adapter leaves the model exactly as it was; training moves
only A and B: r (in + out) numbers per layer instead of in · out (≈ 0.1–1 % of the UNet at r = 4–16),
and the file that holds them is megabytes, not gigabytes. α / r fixes the update's scale when r
changes (the same α works at any rank); the strength s scales the whole update when the adapter is
used (s = 0: the base model; s = 1: as trained; in between: a milder effect).

Using it::

    names = add_lora(unet, LoRAConfig(rank=8), rngs=nnx.Rngs(0))   # inject (returns diffusers names)
    graphdef, lora, frozen = nnx.split(unet, LoRAParam, ...)        # train `lora` only (or wrt=LoRAParam)
    save_lora("me.safetensors", unet)                               # diffusers format; format="kohya" too
    load_lora("someone.safetensors", unet, text_encoder, scale=0.8) # files from diffusers, kohya, A1111
    set_lora_scale(unet, 0.5)                                       # no recompilation: s is array state
    fuse_lora(unet); unfuse_lora(unet)                              # W ← W ± s·(α/r)·A B

:class:`LoRALinear` keeps the base layer's own ``kernel`` and ``bias`` variables under the same names,
so the frozen weights keep their paths (``...attn1.to_q.kernel``) and ``nnx.state(model, BASE)`` is the
base model's parameter tree, whatever adapters it carries. A and B are :class:`LoRAParam`, a subclass
of ``nnx.Param``: ``LoRAParam`` selects the adapters and :data:`BASE` everything else. (So a model with
adapters has more parameters than its checkpoint layout: to write it as a plain checkpoint with
:mod:`sdjax.convert`, bake the LoRA in with ``fuse_lora`` then ``remove_lora``, or drop it with ``remove_lora``.)

Files (:mod:`sdjax.lora.files`): diffusers/peft and kohya/AUTOMATIC1111 layouts.
"""

from sdjax.lora.files import METADATA_KEY, load_lora, save_lora
from sdjax.lora.layers import (
    BASE,
    TEXT_ATTENTION,
    TEXT_MLP,
    UNET_ATTENTION,
    UNET_CONVS,
    UNET_FEED_FORWARD,
    Adapter,
    LoRAConfig,
    LoRALinear,
    LoRAParam,
    add_lora,
    fuse_lora,
    lora_layers,
    lora_params,
    remove_lora,
    set_lora_scale,
    unfuse_lora,
)
from sdjax.lora.lycoris import LoHa, LoKr
