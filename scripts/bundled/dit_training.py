"""Training of the bundled tiny DiT (PixArt transformer + T5 text encoder) on the frozen bundled VAE.

Same recipe and machinery as the UNet stage (``training.py``): v-prediction on the cosine schedule,
10 % caption dropout, EMA of transformer and text encoder, data a pure function of the step, atomic
resumable checkpoints and a JSONL log with the prompted / unconditional denoising errors on held-out
latents. The LR decays (cosine) over the second half of the run: with the UNet, that decay is what
turned rounded squares into circles and squares.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import components
from . import dit_components as dc
from .training import (
    ARTIFACTS,
    Ema,
    denoising_errors,
    lr_factor,
    prediction_target,
    progress_bar,
    training_images,
)


@dataclass
class DitConfig:
    out_dir: str = str(ARTIFACTS / "dit")
    steps: int = 5500
    batch_size: int = 16
    lr: float = 5e-4
    text_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: int = 250
    lr_decay_start: int = 2500  # cosine decay to lr_final_ratio at `steps` from here (-1: none)
    stop_at: int = -1  # stop early without changing the LR schedule (-1: run to `steps`)
    lr_final_ratio: float = 0.1
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    image_size: int = components.IMAGE_SIZE
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    eval_every: int = 500
    eval_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    eval_batch: int = 64


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
    out = Path(config.out_dir)
    state_path = out / "checkpoint.pt"
    vae = dc.load_vae()
    scaling = vae.config.scaling_factor
    tokenizer, text_encoder, transformer = build_models(asdict(config))
    scheduler = components.build_scheduler()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "lr": config.lr, "base_lr": config.lr},
            {"params": list(text_encoder.parameters()), "lr": config.text_lr, "base_lr": config.text_lr},
        ],
        weight_decay=config.weight_decay,
    )
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    ema = Ema(modules, config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)
    state = ckpt.load(state_path) if resume else None
    start = 0
    if state is not None:
        transformer.load_state_dict(state["transformer"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        # The saved groups carry the old base LR: the LR asked for now wins, so a resumed run can go on
        # from where an earlier schedule ended.
        for group, base_lr in zip(optimizer.param_groups, (config.lr, config.text_lr)):
            group["base_lr"] = base_lr
        ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(generator, state["rng"])
        start = state["step"]
    log = ckpt.JsonlLog(out / "log.jsonl", resume_step=start if state is not None else None)
    event = "config" if state is None else "resume"
    log.write(
        {
            "event": event,
            "step": start,
            "transformer_parameters": components.count_parameters(transformer),
            "text_encoder_parameters": components.count_parameters(text_encoder),
            **asdict(config),
        }
    )
    eval_x, eval_prompts = training_images(0, config.eval_batch, config.image_size, split="heldout")
    with torch.no_grad():
        eval_latents = vae.encode(eval_x).latent_dist.mode() * scaling

    def save(step: int) -> None:
        ckpt.atomic_save(
            {
                "transformer": transformer.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": ckpt.rng_state(generator),
                "step": step,
                "config": asdict(config),
            },
            state_path,
        )

    transformer.train()
    text_encoder.train()
    end = config.steps if config.stop_at < 0 else min(config.steps, config.stop_at)
    bar = progress_bar(end, start, "dit")
    window: list[float] = []
    tick = time.perf_counter()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, config)
        x, prompts = training_images(step, config.batch_size, config.image_size)
        drop = torch.rand(len(prompts), generator=generator) < config.caption_dropout
        prompts = ["" if dropped else prompt for prompt, dropped in zip(prompts, drop.tolist())]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mode() * scaling
        noise = torch.randn(latents.shape, generator=generator)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(prompts),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, steps)
        embeddings, mask = dc.encode_prompts(tokenizer, text_encoder, prompts)
        prediction = dc.predict(transformer, noisy, steps, embeddings, mask)
        loss = F.mse_loss(prediction.float(), prediction_target(scheduler, latents, noise, steps).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        window.append(loss.item())
        done = step + 1
        bar.update(1)
        if done % config.log_every == 0 or done == end:
            now = time.perf_counter()
            record: dict[str, Any] = {
                "step": done,
                "loss": float(np.mean(window)),
                "s_per_step": (now - tick) / len(window),
                "lr": optimizer.param_groups[0]["lr"],
            }
            window, tick = [], now
            if done % config.eval_every == 0 or done == end:
                transformer.eval()
                text_encoder.eval()
                errors = dit_conditioning_errors(
                    transformer,
                    text_encoder,
                    tokenizer,
                    scheduler,
                    eval_latents,
                    eval_prompts,
                    config.eval_timesteps,
                )
                record.update({f"eval_{k}": v for k, v in errors.items()})
                transformer.train()
                text_encoder.train()
                tick = time.perf_counter()
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", gap=f"{record.get('eval_gap', float('nan')):.4f}")
        if done % config.checkpoint_every == 0 or done == end:
            save(done)
    bar.close()
    return state_path


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
    transformer.load_state_dict(state["transformer"])
    text_encoder.load_state_dict(state["text_encoder"])
    if use_ema:
        modules = {"transformer": transformer, "text_encoder": text_encoder}
        ema = Ema(modules, 0.0)
        ema.load_state_dict(state["ema"])
        ema.copy_to(modules)
    pipe = dc.assemble_pipeline(dc.load_vae(), text_encoder.eval(), tokenizer, transformer.eval())
    return components.save_pipeline(pipe, out, dtype=dtype)
