"""Fine-tuned additions a pipeline can load (notebook 07, :mod:`sdjax.finetune`): LoRA files and
textual-inversion embeddings, as methods of :class:`sdjax.pipeline.StableDiffusion`.

:mod:`sdjax.lora` and :mod:`sdjax.textual_inversion` are imported when a method is first called, so a
pipeline that runs a plain checkpoint does not load them.
"""

from __future__ import annotations

import os


class Adapters:
    """LoRA and textual inversion for a pipeline with ``unet``, ``text_encoder`` and ``tokenizer`` (and SDXL's
    ``text_encoder_2``, None for SD 1.x/2.x)."""

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> dict:
        """Load a LoRA file — diffusers/peft (``save_lora_weights``) or kohya/AUTOMATIC1111 layout, told apart
        by its keys — into the UNet and, if the file adapts it, the text encoder, at strength ``scale``
        (:func:`sdjax.lora.load_lora`). It replaces any LoRA loaded before. Returns the loader's report."""
        from sdjax import lora

        return lora.load_lora(path, self.unet, self.text_encoder, scale=scale, text_encoder_2=self.text_encoder_2)

    def set_lora_scale(self, scale: float) -> None:
        """The LoRA strength s: W + s · (α/r) · A B (0: the base model; no recompilation)."""
        from sdjax import lora

        modules = [
            m for m in (self.unet, self.text_encoder, self.text_encoder_2) if m is not None and lora.lora_layers(m)
        ]
        if not modules:
            raise ValueError("set_lora_scale: no LoRA is loaded (pipe.load_lora(path) first)")
        for module in modules:
            lora.set_lora_scale(module, scale)

    def unload_lora(self) -> None:
        """Take the LoRA out: the plain base layers back in the UNet and the text encoder."""
        from sdjax import lora

        for module in (self.unet, self.text_encoder, self.text_encoder_2):
            if module is not None:
                lora.remove_lora(module)

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (diffusers' ``learned_embeds.safetensors``/``.bin``, AUTOMATIC1111's
        ``.pt``/``.safetensors``) as a new token, usable in prompts and negative prompts; ``token`` overrides
        the name the file gives (:mod:`sdjax.textual_inversion`). Returns the tokens added."""
        from sdjax import textual_inversion

        embeddings = textual_inversion.load_embeddings(path, token)
        return textual_inversion.add_embeddings(self.tokenizer, self.text_encoder, embeddings)
