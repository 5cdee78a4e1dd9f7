"""Training of the bundled tiny DiT (PixArt transformer + T5 text encoder) on the frozen bundled VAE.

The same recipe and loop (``loop.py``) as the UNet stage (``training.py``): v-prediction on the
cosine schedule, 10 % caption dropout, EMA of transformer and text encoder, data a pure function of the
step, atomic resumable checkpoints and a JSONL log with the prompted / unconditional denoising errors on
held-out latents. The LR decays (cosine) over the second half of the run: with the UNet, that decay is
what turned rounded squares into circles and squares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import components
from . import dit_components as dc
from .loop import Denoiser, DenoiserConfig, denoising_errors, load_weights, saved_state, train_denoiser
from .training import ARTIFACTS


@dataclass(kw_only=True)
class DitConfig(DenoiserConfig):
    out_dir: str = str(ARTIFACTS / "dit")
    steps: int = 5500
    lr: float = 5e-4
    text_lr: float = 5e-4
    lr_decay_start: int = 2500
    stop_at: int = -1
    checkpoint_every: int = 250
    eval_every: int = 500
    layers: int = 6
    heads: int = 4
    head_dim: int = 32


def build_models(config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(tokenizer, text encoder, transformer) freshly initialised as ``config`` (a DitConfig dict) says."""
    tokenizer = dc.build_tokenizer()
    text_encoder = dc.build_text_encoder(tokenizer, seed=config["seed"])
    transformer = dc.build_transformer(
        caption_channels=text_encoder.config.d_model,
        layers=config["layers"],
        heads=config["heads"],
        head_dim=config["head_dim"],
        seed=config["seed"],
    )
    return tokenizer, text_encoder, transformer


@torch.no_grad()
def dit_conditioning_errors(
    transformer: Any,
    text_encoder: Any,
    tokenizer: Any,
    scheduler: Any,
    latents: torch.Tensor,
    prompts: list[str],
    timesteps: list[int],
) -> dict[str, float]:
    """The transformer's prompted and unconditional denoising errors (``training.denoising_errors``)."""
    cond = dc.encode_prompts(tokenizer, text_encoder, prompts)
    uncond = dc.encode_prompts(tokenizer, text_encoder, [""] * len(prompts))

    def denoise(noisy: torch.Tensor, steps: torch.Tensor, prompted: bool) -> torch.Tensor:
        return dc.predict(transformer, noisy, steps, *(cond if prompted else uncond))

    return denoising_errors(denoise, scheduler, latents, timesteps)


def train_dit(config: DitConfig, resume: bool = False) -> Path:
    """Train the transformer and the text encoder jointly on the bundled VAE's latents."""
    vae = dc.load_vae()
    tokenizer, text_encoder, transformer = build_models(asdict(config))
    scheduler = components.build_scheduler()

    def predict(prompts: list[str], noisy: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return dc.predict(transformer, noisy, steps, *dc.encode_prompts(tokenizer, text_encoder, prompts))

    def errors(latents: torch.Tensor, prompts: list[str], timesteps: list[int]) -> dict[str, float]:
        return dit_conditioning_errors(
            transformer, text_encoder, tokenizer, scheduler, latents, prompts, timesteps
        )

    denoiser = Denoiser(
        label="dit",
        key="transformer",
        model=transformer,
        text_encoder=text_encoder,
        vae=vae,
        scaling=vae.config.scaling_factor,
        scheduler=scheduler,
        predict=predict,
        conditioning_errors=errors,
    )
    return train_denoiser(config, denoiser, saved_state(config, resume))


def export_dit(
    dit_checkpoint: str | Path = ARTIFACTS / "dit" / "checkpoint.pt",
    out: str | Path = dc.DIT_MODEL_DIR,
    use_ema: bool = True,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Assemble the trained parts into a PixArtSigmaPipeline folder (``dtype`` safetensors)."""
    state = ckpt.load(dit_checkpoint)
    if state is None:
        raise FileNotFoundError(f"no DiT checkpoint at {dit_checkpoint}")
    tokenizer, text_encoder, transformer = build_models(state["config"])
    load_weights(state, {"transformer": transformer, "text_encoder": text_encoder}, use_ema)
    pipe = dc.assemble_pipeline(dc.load_vae(), text_encoder.eval(), tokenizer, transformer.eval())
    return components.save_pipeline(pipe, out, dtype=dtype)
