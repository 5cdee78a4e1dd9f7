"""Training of the bundled model: the VAE, then the UNet and text encoder (the LinFusion teacher).

Both stages are resumable: data is a pure function of the step (item seeds ``step * batch + i``), and
a checkpoint holds weights, optimizer, EMA, RNG state and step, written atomically every few minutes,
so a run killed at any moment continues bit-for-bit from its last checkpoint with ``resume=True``.
The UNet stage logs the prompted and the unconditional denoising error on a fixed held-out batch,
which exposes a dead conditioning path long before samples would.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
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

ARTIFACTS = Path("artifacts/bundled")


def progress_bar(total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, mininterval=30.0, dynamic_ncols=False)


def training_images(
    step: int, batch_size: int, size: int, split: str = "train"
) -> tuple[torch.Tensor, list[str]]:
    seeds = [shapes.split_seed(step * batch_size + i, split) for i in range(batch_size)]
    images, scenes = shapes.batch(seeds, size)
    return shapes.to_tensor(images), [scene.caption() for scene in scenes]


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
    state_path = out / "checkpoint.pt"
    vae = components.build_vae(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    state = ckpt.load(state_path) if resume else None
    start = 0
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(generator, state["rng"])
        start = state["step"]
    log = ckpt.JsonlLog(out / "log.jsonl", resume_step=start if state is not None else None)
    if state is None:
        log.write({"event": "config", "step": 0, **asdict(config)})
    else:
        log.write({"event": "resume", "step": start, **asdict(config)})
    eval_x, _ = training_images(0, 64, config.image_size, split="heldout")

    def save(step: int) -> None:
        ckpt.atomic_save(
            {
                "model": vae.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": ckpt.rng_state(generator),
                "step": step,
                "config": asdict(config),
            },
            state_path,
        )

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
            save(done)
    bar.close()
    final = out / "final"
    vae.eval()
    vae.save_pretrained(final, safe_serialization=True)
    return final


# ---------------------------------------------------------------------------------------------- UNet
@dataclass
class UnetConfig:
    out_dir: str = str(ARTIFACTS / "unet")
    vae_dir: str = str(ARTIFACTS / "vae" / "final")
    steps: int = 20000
    batch_size: int = 16
    lr: float = 4e-4
    text_lr: float = 4e-4
    weight_decay: float = 0.01
    warmup: int = 250
    # From this step on, cosine decay of the LR down to lr_final_ratio at `steps` (-1: no decay). The
    # first 12,000 steps were run with constant LR; the decay sharpens fine detail (circle vs square).
    lr_decay_start: int = 12000
    # Stop after this many steps (-1: run to ``steps``) without changing the LR schedule, which still
    # runs to ``steps``: the bundled teacher is the step-14,100 checkpoint of the 20,000-step schedule.
    stop_at: int = 14100
    lr_final_ratio: float = 0.1
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    image_size: int = components.IMAGE_SIZE
    seed: int = 0
    checkpoint_every: int = 300
    log_every: int = 25
    eval_every: int = 250
    eval_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    eval_batch: int = 64
    scaling_images: int = 1024


class Ema:
    """Exponential moving average of floating-point parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = {
            f"{name}.{key}": p.detach().clone()
            for name, module in modules.items()
            for key, p in module.named_parameters()
        }
        self.modules = modules

    def _live(self) -> list[torch.Tensor]:
        return [p for module in self.modules.values() for p in module.parameters()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.params.values()), [p.detach() for p in self._live()], 1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.params[key].copy_(value)

    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        """Write the averaged weights into ``modules`` (same names as at construction)."""
        with torch.no_grad():
            for name, module in modules.items():
                for key, p in module.named_parameters():
                    p.copy_(self.params[f"{name}.{key}"])


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


@torch.no_grad()
def denoising_errors(
    denoise: Any, scheduler: Any, latents: torch.Tensor, timesteps: list[int], seed: int = 1234
) -> dict[str, float]:
    """Errors of ``denoise(noisy, steps, prompted)`` with and without the prompt, per timestep and overall.

    A model that ignores its caption has equal errors; a working conditioning path makes the prompted
    error clearly lower at high noise, where the caption is the only source of the image content.
    """
    generator = torch.Generator().manual_seed(seed)
    result: dict[str, float] = {}
    totals = [0.0, 0.0]
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator)
        steps = torch.full((latents.shape[0],), t, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, steps)
        target = prediction_target(scheduler, latents, noise, steps)
        errors = [F.mse_loss(denoise(noisy, steps, prompted), target).item() for prompted in (True, False)]
        result[f"cond_t{t}"], result[f"uncond_t{t}"] = errors
        totals[0] += errors[0]
        totals[1] += errors[1]
    result["cond"] = totals[0] / len(timesteps)
    result["uncond"] = totals[1] / len(timesteps)
    result["gap"] = result["uncond"] - result["cond"]
    return result


def prediction_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, steps)
    return noise


def lr_factor(step: int, config: UnetConfig) -> float:
    """Linear warm-up, constant, then (optionally) cosine decay: resuming with a later ``steps`` and a
    ``lr_decay_start`` at or after the steps already done continues the same run."""
    factor = min(1.0, (step + 1) / config.warmup)
    if 0 <= config.lr_decay_start <= step and config.steps > config.lr_decay_start:
        progress = (step - config.lr_decay_start) / (config.steps - config.lr_decay_start)
        factor *= config.lr_final_ratio + (1 - config.lr_final_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
    return factor


def train_unet(config: UnetConfig, resume: bool = False) -> Path:
    """Train the UNet and the text encoder jointly on VAE latents; returns the checkpoint path."""
    out = Path(config.out_dir)
    state_path = out / "checkpoint.pt"
    vae = load_vae(config.vae_dir)
    tokenizer = components.build_tokenizer()
    text_encoder = components.build_text_encoder(tokenizer, seed=config.seed)
    unet = components.build_unet(cross_attention_dim=text_encoder.config.hidden_size, seed=config.seed)
    scheduler = components.build_scheduler()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": config.lr, "base_lr": config.lr},
            {"params": list(text_encoder.parameters()), "lr": config.text_lr, "base_lr": config.text_lr},
        ],
        weight_decay=config.weight_decay,
    )
    modules = {"unet": unet, "text_encoder": text_encoder}
    ema = Ema(modules, config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)
    state = ckpt.load(state_path) if resume else None
    start = 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        # The saved groups carry the old base LR: the LR asked for now wins, so a resumed run can go on
        # from where an earlier schedule ended.
        for group, base_lr in zip(optimizer.param_groups, (config.lr, config.text_lr)):
            group["base_lr"] = base_lr
        ema.load_state_dict(state["ema"])
        ckpt.set_rng_state(generator, state["rng"])
        start = state["step"]
        scaling = state["scaling_factor"]
    else:
        scaling = latent_scaling_factor(vae, config.scaling_images, config.image_size)
    vae.register_to_config(scaling_factor=scaling)
    log = ckpt.JsonlLog(out / "log.jsonl", resume_step=start if state is not None else None)
    if state is None:
        log.write({"event": "config", "step": 0, "scaling_factor": scaling, **asdict(config)})
    else:
        log.write({"event": "resume", "step": start, "scaling_factor": scaling, **asdict(config)})

    eval_x, eval_prompts = training_images(0, config.eval_batch, config.image_size, split="heldout")
    with torch.no_grad():
        eval_latents = vae.encode(eval_x).latent_dist.mode() * scaling

    def save(step: int) -> None:
        ckpt.atomic_save(
            {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": ckpt.rng_state(generator),
                "step": step,
                "scaling_factor": scaling,
                "config": asdict(config),
            },
            state_path,
        )

    unet.train()
    text_encoder.train()
    bar = progress_bar(config.steps, start, "unet")
    window: list[float] = []
    tick = time.perf_counter()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    end = config.steps if config.stop_at < 0 else min(config.steps, config.stop_at)
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
        embeddings = encode_prompts(tokenizer, text_encoder, prompts)
        prediction = unet(noisy, steps, embeddings).sample
        loss = F.mse_loss(prediction.float(), prediction_target(scheduler, latents, noise, steps).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        window.append(loss.item())
        done = step + 1
        bar.update(1)
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            record: dict[str, Any] = {
                "step": done,
                "loss": float(np.mean(window)),
                "s_per_step": (now - tick) / len(window),
            }
            window, tick = [], now
            if done % config.eval_every == 0 or done == config.steps:
                unet.eval()
                text_encoder.eval()
                errors = conditioning_errors(
                    unet,
                    text_encoder,
                    tokenizer,
                    scheduler,
                    eval_latents,
                    eval_prompts,
                    config.eval_timesteps,
                )
                record.update({f"eval_{k}": v for k, v in errors.items()})
                unet.train()
                text_encoder.train()
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", gap=f"{record.get('eval_gap', float('nan')):.4f}")
        if done % config.checkpoint_every == 0 or done == end:
            save(done)
    bar.close()
    return state_path


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
    unet.load_state_dict(state["unet"])
    text_encoder.load_state_dict(state["text_encoder"])
    if use_ema:
        ema = Ema({"unet": unet, "text_encoder": text_encoder}, 0.0)
        ema.load_state_dict(state["ema"])
        ema.copy_to({"unet": unet, "text_encoder": text_encoder})
    pipe = components.assemble_pipeline(vae, text_encoder.eval(), tokenizer, unet.eval())
    return components.save_pipeline(pipe, out, dtype=dtype)
