"""The training loop shared by the bundled UNet (``training.py``) and the bundled DiT (``dit_training.py``).

Both stages train a denoiser and its text encoder jointly on frozen-VAE latents with one recipe:
the scheduler's prediction target, caption dropout, AdamW with a parameter group each, linear warm-up
then (optionally) cosine decay of the LR, gradient clipping, an EMA of both models, atomic resumable
checkpoints and a JSONL log with the prompted and unconditional denoising errors on held-out latents.
What differs between the stages (the models, how prompts become a prediction, facts saved with the
checkpoint) comes in as a ``Denoiser``. Data is a pure function of the step and the random draws
(caption dropout, noise, timesteps) come from one generator in a fixed order, so a resumed run
continues the same stream bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from linfusion.bundled import shapes

from . import checkpoint as ckpt
from . import components

CHECKPOINT = "checkpoint.pt"


def progress_bar(total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, mininterval=30.0, dynamic_ncols=False)


def training_images(
    step: int, batch_size: int, size: int, split: str = "train"
) -> tuple[torch.Tensor, list[str]]:
    seeds = [shapes.split_seed(step * batch_size + i, split) for i in range(batch_size)]
    images, scenes = shapes.batch(seeds, size)
    return shapes.to_tensor(images), [scene.caption() for scene in scenes]


@dataclass(kw_only=True)
class DenoiserConfig:
    """The settings the loop reads; each stage's config gives the defaults left open here."""

    out_dir: str
    steps: int
    batch_size: int = 16
    lr: float
    text_lr: float
    weight_decay: float = 0.01
    warmup: int = 250
    lr_decay_start: int  # cosine decay of the LR to lr_final_ratio at `steps` from here (-1: none)
    stop_at: int  # stop early without changing the LR schedule (-1: run to `steps`)
    lr_final_ratio: float = 0.1
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    image_size: int = components.IMAGE_SIZE
    seed: int = 0
    checkpoint_every: int
    log_every: int = 25
    eval_every: int
    eval_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    eval_batch: int = 64


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


def load_weights(state: dict[str, Any], modules: dict[str, torch.nn.Module], use_ema: bool) -> None:
    """Load a checkpoint's weights into ``modules`` (keyed as saved): the EMA's when ``use_ema``."""
    for key, module in modules.items():
        module.load_state_dict(state[key])
    if use_ema:
        ema = Ema(modules, 0.0)
        ema.load_state_dict(state["ema"])
        ema.copy_to(modules)


def prediction_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, steps)
    return noise


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


def lr_factor(step: int, config: DenoiserConfig) -> float:
    """Linear warm-up, constant, then (optionally) cosine decay: resuming with a later ``steps`` and a
    ``lr_decay_start`` at or after the steps already done continues the same run."""
    factor = min(1.0, (step + 1) / config.warmup)
    if 0 <= config.lr_decay_start <= step and config.steps > config.lr_decay_start:
        progress = (step - config.lr_decay_start) / (config.steps - config.lr_decay_start)
        factor *= config.lr_final_ratio + (1 - config.lr_final_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
    return factor


@dataclass
class Denoiser:
    """One stage's models and the two things the loop cannot know: prediction and evaluation."""

    label: str  # the progress bar's
    key: str  # the denoiser's checkpoint key ("unet", "transformer"); the text encoder's is "text_encoder"
    model: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: Any
    scaling: float  # of the VAE latents
    scheduler: Any
    # (prompts, noisy latents, timesteps) -> the model's prediction, with gradients
    predict: Callable[[list[str], torch.Tensor, torch.Tensor], torch.Tensor]
    # (latents, prompts, timesteps) -> ``denoising_errors`` of the models as they are now
    conditioning_errors: Callable[[torch.Tensor, list[str], list[int]], dict[str, float]]
    facts: dict[str, Any] = field(default_factory=dict)  # saved in every checkpoint and the first log record

    def modules(self) -> dict[str, torch.nn.Module]:
        return {self.key: self.model, "text_encoder": self.text_encoder}

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(x).latent_dist.mode() * self.scaling

    def train(self, mode: bool) -> None:
        self.model.train(mode)
        self.text_encoder.train(mode)


def saved_state(config: DenoiserConfig, resume: bool) -> dict[str, Any] | None:
    """The checkpoint in ``out_dir`` when resuming (None when there is none yet or not resuming)."""
    return ckpt.load(Path(config.out_dir) / CHECKPOINT) if resume else None


def denoising_loss(
    step: int, config: DenoiserConfig, denoiser: Denoiser, generator: torch.Generator
) -> torch.Tensor:
    """The loss of one training step; draws caption dropout, noise and timesteps, in that order."""
    x, prompts = training_images(step, config.batch_size, config.image_size)
    drop = torch.rand(len(prompts), generator=generator) < config.caption_dropout
    prompts = ["" if dropped else prompt for prompt, dropped in zip(prompts, drop.tolist())]
    latents = denoiser.latents(x)
    scheduler = denoiser.scheduler
    noise = torch.randn(latents.shape, generator=generator)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(prompts),), generator=generator)
    noisy = scheduler.add_noise(latents, noise, steps)
    prediction = denoiser.predict(prompts, noisy, steps)
    return F.mse_loss(prediction.float(), prediction_target(scheduler, latents, noise, steps).float())


def train_denoiser(config: DenoiserConfig, denoiser: Denoiser, state: dict[str, Any] | None) -> Path:
    """Train ``denoiser`` as ``config`` says, from scratch or from ``state`` (``saved_state``);
    returns the checkpoint path. The log and the checkpoint are written at the last step too."""
    out = Path(config.out_dir)
    modules = denoiser.modules()
    optimizer = torch.optim.AdamW(
        [
            {"params": list(denoiser.model.parameters()), "lr": config.lr, "base_lr": config.lr},
            {
                "params": list(denoiser.text_encoder.parameters()),
                "lr": config.text_lr,
                "base_lr": config.text_lr,
            },
        ],
        weight_decay=config.weight_decay,
    )
    ema = Ema(modules, config.ema_decay)
    stateful = {**modules, "ema": ema}
    generator = torch.Generator().manual_seed(config.seed)
    start = 0
    if state is not None:
        start = ckpt.restore_run(state, stateful, optimizer, generator)
        # The saved groups carry the old base LR: the LR asked for now wins, so a resumed run can go on
        # from where an earlier schedule ended.
        for group, base_lr in zip(optimizer.param_groups, (config.lr, config.text_lr)):
            group["base_lr"] = base_lr
    counts = {f"{key}_parameters": components.count_parameters(module) for key, module in modules.items()}
    log = ckpt.open_log(
        out / "log.jsonl",
        start if state is not None else None,
        {**counts, **denoiser.facts, **asdict(config)},
    )
    eval_x, eval_prompts = training_images(0, config.eval_batch, config.image_size, split="heldout")
    eval_latents = denoiser.latents(eval_x)

    denoiser.train(True)
    end = config.steps if config.stop_at < 0 else min(config.steps, config.stop_at)
    bar = progress_bar(end, start, denoiser.label)
    window: list[float] = []
    tick = time.perf_counter()
    params = [p for module in modules.values() for p in module.parameters()]
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, config)
        loss = denoising_loss(step, config, denoiser, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        window.append(loss.item())
        done = step + 1
        bar.update(1)
        if done % config.log_every == 0 or done == end:
            record: dict[str, Any] = {
                "step": done,
                "loss": float(np.mean(window)),
                "s_per_step": (time.perf_counter() - tick) / len(window),
                "lr": optimizer.param_groups[0]["lr"],
            }
            if done % config.eval_every == 0 or done == end:
                denoiser.train(False)
                errors = denoiser.conditioning_errors(eval_latents, eval_prompts, config.eval_timesteps)
                record.update({f"eval_{k}": v for k, v in errors.items()})
                denoiser.train(True)
            window, tick = [], time.perf_counter()  # the next s_per_step leaves the evaluation out
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", gap=f"{record.get('eval_gap', float('nan')):.4f}")
        if done % config.checkpoint_every == 0 or done == end:
            extra = {**denoiser.facts, "config": asdict(config)}
            ckpt.save_run(out / CHECKPOINT, stateful, optimizer, generator, done, **extra)
    bar.close()
    return out / CHECKPOINT
