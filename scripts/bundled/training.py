"""Training of the bundled model: the VAE, then the UNet and text encoder (the LinFusion teacher).

Both stages are resumable: data is a pure function of the step (item seeds ``step * batch + i``), and
a checkpoint holds weights, optimizer, EMA, RNG state and step, written atomically every few minutes,
so a run killed at any moment continues bit-for-bit from its last checkpoint with ``resume=True``.
The UNet stage logs the prompted and the unconditional denoising error on a fixed held-out batch,
which exposes a dead conditioning path long before samples would; its step loop (``loop.py``) is the
one the DiT stage runs too.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from linfusion.bundled import shapes
from linfusion.distill.teacher import caption_token_ids
from linfusion.vae_attention import psnr

from . import checkpoint as ckpt
from . import components
from .loop import (
    CHECKPOINT,
    Denoiser,
    DenoiserConfig,
    denoising_errors,
    load_weights,
    progress_bar,
    saved_state,
    train_denoiser,
    training_images,
)

ARTIFACTS = Path("artifacts/bundled")


# ----------------------------------------------------------------------------------------------- VAE
@dataclass
class VaeConfig:
    out_dir: str = str(ARTIFACTS / "vae")
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    image_size: int = components.IMAGE_SIZE
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    eval_every: int = 250
    l1_weight: float = 1.0
    logvar_max: float = -9.0  # pushes the posterior std below ~0.01 so that sample() ~= mode()


def _vae_losses(vae: Any, x: torch.Tensor, config: VaeConfig) -> tuple[torch.Tensor, dict[str, float]]:
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.mode()).sample
    mse = F.mse_loss(reconstruction, x)
    l1 = F.l1_loss(reconstruction, x)
    logvar_penalty = F.relu(posterior.logvar - config.logvar_max).mean()
    mean_penalty = posterior.mean.pow(2).mean()
    loss = mse + config.l1_weight * l1 + 1e-2 * logvar_penalty + 1e-4 * mean_penalty
    return loss, {"mse": mse.item(), "l1": l1.item(), "logvar_penalty": logvar_penalty.item()}


def train_vae(config: VaeConfig, resume: bool = False) -> Path:
    """Train the AutoencoderKL; saves ``out_dir/final`` (a diffusers folder) when done."""
    out = Path(config.out_dir)
    vae = components.build_vae(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    stateful = {"model": vae}
    state = ckpt.load(out / CHECKPOINT) if resume else None
    start = 0 if state is None else ckpt.restore_run(state, stateful, optimizer, generator)
    log = ckpt.open_log(out / "log.jsonl", start if state is not None else None, asdict(config))
    eval_x, _ = training_images(0, 64, config.image_size, split="heldout")

    vae.train()
    bar = progress_bar(config.steps, start, "vae")
    window: list[dict[str, float]] = []
    tick = time.perf_counter()
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup)
        x, _ = training_images(step, config.batch_size, config.image_size)
        loss, parts = _vae_losses(vae, x, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        window.append({"loss": loss.item(), **parts})
        done = step + 1
        bar.update(1)
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            record = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            record.update(step=done, s_per_step=(now - tick) / len(window))
            window, tick = [], now
            if done % config.eval_every == 0 or done == config.steps:
                vae.eval()
                with torch.no_grad():
                    rec = vae.decode(vae.encode(eval_x).latent_dist.mode()).sample
                record["heldout_psnr"] = psnr(rec, eval_x)
                vae.train()
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=record.get("heldout_psnr", ""))
        if done % config.checkpoint_every == 0 or done == config.steps:
            ckpt.save_run(out / CHECKPOINT, stateful, optimizer, generator, done, config=asdict(config))
    bar.close()
    final = out / "final"
    vae.eval()
    vae.save_pretrained(final, safe_serialization=True)
    return final


# ---------------------------------------------------------------------------------------------- UNet
@dataclass(kw_only=True)
class UnetConfig(DenoiserConfig):
    out_dir: str = str(ARTIFACTS / "unet")
    steps: int = 20000
    lr: float = 4e-4
    text_lr: float = 4e-4
    # The first 12,000 steps were run with constant LR; the decay sharpens fine detail (circle vs square).
    lr_decay_start: int = 12000
    # The bundled teacher is the step-14,100 checkpoint of the 20,000-step schedule.
    stop_at: int = 14100
    checkpoint_every: int = 300
    eval_every: int = 250
    vae_dir: str = str(ARTIFACTS / "vae" / "final")
    scaling_images: int = 1024


def load_vae(folder: str | Path) -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_scaling_factor(vae: Any, n_images: int = 1024, image_size: int = components.IMAGE_SIZE) -> float:
    """1 / std of the VAE latents over training images, so scaled latents have unit variance."""
    latents = []
    for chunk in range(0, n_images, 128):
        images, _ = shapes.batch(range(chunk, min(chunk + 128, n_images)), image_size)
        x = shapes.to_tensor(images)
        latents.append(vae.encode(x).latent_dist.mode())
    return float(1.0 / torch.cat(latents).std())


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """Prompt embeddings exactly as StableDiffusionPipeline computes them (padded, last hidden state)."""
    return text_encoder(caption_token_ids(tokenizer, prompts))[0]


@torch.no_grad()
def conditioning_errors(
    unet: Any,
    text_encoder: Any,
    tokenizer: Any,
    scheduler: Any,
    latents: torch.Tensor,
    prompts: list[str],
    timesteps: list[int],
    seed: int = 1234,
) -> dict[str, float]:
    """Mean prediction error of the UNet with the prompt and with the empty prompt, per timestep and overall."""
    cond = encode_prompts(tokenizer, text_encoder, prompts)
    uncond = encode_prompts(tokenizer, text_encoder, [""] * len(prompts))

    def denoise(noisy: torch.Tensor, steps: torch.Tensor, prompted: bool) -> torch.Tensor:
        return unet(noisy, steps, cond if prompted else uncond).sample

    return denoising_errors(denoise, scheduler, latents, timesteps, seed)


def train_unet(config: UnetConfig, resume: bool = False) -> Path:
    """Train the UNet and the text encoder jointly on VAE latents; returns the checkpoint path."""
    vae = load_vae(config.vae_dir)
    tokenizer = components.build_tokenizer()
    text_encoder = components.build_text_encoder(tokenizer, seed=config.seed)
    unet = components.build_unet(cross_attention_dim=text_encoder.config.hidden_size, seed=config.seed)
    scheduler = components.build_scheduler()
    state = saved_state(config, resume)
    if state is not None:
        scaling = state["scaling_factor"]
    else:
        scaling = latent_scaling_factor(vae, config.scaling_images, config.image_size)
    vae.register_to_config(scaling_factor=scaling)

    def predict(prompts: list[str], noisy: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return unet(noisy, steps, encode_prompts(tokenizer, text_encoder, prompts)).sample

    def errors(latents: torch.Tensor, prompts: list[str], timesteps: list[int]) -> dict[str, float]:
        return conditioning_errors(unet, text_encoder, tokenizer, scheduler, latents, prompts, timesteps)

    denoiser = Denoiser(
        label="unet",
        key="unet",
        model=unet,
        text_encoder=text_encoder,
        vae=vae,
        scaling=scaling,
        scheduler=scheduler,
        predict=predict,
        conditioning_errors=errors,
        facts={"scaling_factor": scaling},
    )
    return train_denoiser(config, denoiser, state)


def export_pipeline(
    unet_checkpoint: str | Path = ARTIFACTS / "unet" / "checkpoint.pt",
    vae_dir: str | Path = ARTIFACTS / "vae" / "final",
    out: str | Path = components.MODEL_DIR,
    use_ema: bool = True,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Assemble the trained parts into a StableDiffusionPipeline folder (fp16 safetensors)."""
    state = ckpt.load(unet_checkpoint)
    if state is None:
        raise FileNotFoundError(f"no UNet checkpoint at {unet_checkpoint}")
    config = state["config"]
    vae = load_vae(vae_dir)
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    tokenizer = components.build_tokenizer()
    text_encoder = components.build_text_encoder(tokenizer, seed=config["seed"])
    unet = components.build_unet(cross_attention_dim=text_encoder.config.hidden_size, seed=config["seed"])
    load_weights(state, {"unet": unet, "text_encoder": text_encoder}, use_ema)
    pipe = components.assemble_pipeline(vae, text_encoder.eval(), tokenizer, unet.eval())
    return components.save_pipeline(pipe, out, dtype=dtype)
