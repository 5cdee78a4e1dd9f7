"""The bundled tiny DiT: builders for its stock diffusers / transformers parts (training side).

A ``PixArtSigmaPipeline`` shaped like the real one: a ``PixArtTransformer2DModel`` (AdaLN-single
timestep conditioning, patch 2, q/k/v biases, caption projection from the text width) over the SAME
frozen VAE as the bundled UNet model (32 px -> 16x16x4 latents -> 64 tokens), a small ``T5EncoderModel``
(relative positions, so the pipeline's padding to 300 tokens with an attention mask gives exactly the
embeddings of the short padding used in training) over the bundled word-level tokenizer, and the
UNet's scheduler (cosine, v-prediction, DDIM "leading"). See docs/bundled-model.md.
"""

from __future__ import annotations

from typing import Any

import torch

from linfusion.bundled.paths import DIT_MODEL_DIR, MODEL_DIR

from . import components

VAE_DIR = MODEL_DIR / "vae"
MAX_SEQUENCE_LENGTH = 300  # PixArtSigmaPipeline's default padding
TRAIN_TOKENS = 32  # training pads to this (masked: same embeddings as 300); captions have <= 30 tokens
TEXT_HIDDEN = 128
__all__ = ["DIT_MODEL_DIR"]  # re-exported for the scripts


def build_tokenizer() -> Any:
    """The bundled word-level tokenizer, allowed the pipeline's 300-token padding."""
    return components.build_tokenizer(model_max_length=MAX_SEQUENCE_LENGTH)


def build_text_encoder(tokenizer: Any, hidden_size: int = TEXT_HIDDEN, seed: int = 0) -> Any:
    """A 2-layer T5 encoder (bidirectional, relative position buckets, gated GELU), no dropout."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden_size,
        d_kv=hidden_size // 4,
        d_ff=2 * hidden_size,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def build_transformer(
    caption_channels: int = TEXT_HIDDEN, layers: int = 6, heads: int = 4, head_dim: int = 32, seed: int = 0
) -> Any:
    """A PixArt-Sigma-shaped transformer on the 16x16x4 latents (64 tokens of 2x2 patches), no learned sigma."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        cross_attention_dim=heads * head_dim,
        attention_bias=True,
        sample_size=components.IMAGE_SIZE // 2,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=caption_channels,
        use_additional_conditions=False,
    )


def load_vae() -> Any:
    """The bundled UNet model's VAE (frozen, fp32, its measured latent scaling factor in its config)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(VAE_DIR), torch_dtype=torch.float32, local_files_only=True)
    return vae.eval().requires_grad_(False)


def assemble_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, transformer: Any) -> Any:
    """A PixArtSigmaPipeline from the parts, with the bundled scheduler."""
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=components.build_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(folder: Any = DIT_MODEL_DIR, dtype: torch.dtype = torch.float32) -> Any:
    """The DiT pipeline folder, offline, in fp32."""
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_prompts(
    tokenizer: Any, text_encoder: Any, prompts: list[str], length: int = TRAIN_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, attention mask) as PixArt pipelines compute them, padded to ``length`` tokens."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    embeddings = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return embeddings, tokens.attention_mask


def predict(transformer: Any, noisy: torch.Tensor, steps: torch.Tensor, embeddings: Any, mask: Any) -> Any:
    """The transformer's prediction, called as the PixArt pipelines call it."""
    return transformer(
        noisy,
        encoder_hidden_states=embeddings,
        encoder_attention_mask=mask,
        timestep=steps,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample
