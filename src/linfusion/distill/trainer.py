"""The distillation loop: student = teacher denoiser (a UNet, or a PixArt transformer) with LinFusion mounted.

One denoiser serves both passes: the teacher pass swaps the original ``attn1`` layers back in
(:meth:`LinFusion.original_attention`), so no second copy is needed. Only the LinFusion layers train.
Loss = w_noise MSE(student, target) + w_kd MSE(student, teacher) + w_feat mean_l MSE(student attn1_l,
teacher attn1_l), in fp32. Steps are optimizer steps. Gradients of the (small) LinFusion parameters are
averaged across processes by hand after each accumulation window, which keeps the denoiser unwrapped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import atomic_file, atomic_write_text, replace_folder, torch_save
from ..model import LinFusion, denoiser_of
from ..registry import is_dit, is_sdxl
from .config import RUN_MARKER, DistillConfig, DistillConfigError
from .data import (
    CachedLatentDataset,
    DataError,
    DistillDataset,
    check_some_image_readable,
    collate,
    epoch_order,
    open_source,
)
from .resume import (
    CHECKPOINT_PREFIX,
    LOAD_ERRORS,
    Checkpoint,
    CheckpointError,
    checked_resume_point,
    complete_checkpoints,
    load_checkpoint_files,
)
from .teacher import check_teacher_source, frozen, load_teacher, predict, text_conditioner

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]


class FeatureRecorder:
    """Forward hooks that keep each attn1 layer's output, for the student and for the teacher."""

    def __init__(self, pairs: list[tuple[torch.nn.Module, torch.nn.Module]]):
        self.student: dict[int, torch.Tensor] = {}
        self.teacher: dict[int, torch.Tensor] = {}
        self.handles = []
        for index, (student, teacher) in enumerate(pairs):
            self.handles.append(student.register_forward_hook(self._keeper(self.student, index)))
            self.handles.append(teacher.register_forward_hook(self._keeper(self.teacher, index)))

    @staticmethod
    def _keeper(store: dict[int, torch.Tensor], index: int) -> Callable:
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            store[index] = output

        return hook

    def loss(self) -> torch.Tensor:
        losses = [F.mse_loss(self.student[i].float(), self.teacher[i].float()) for i in sorted(self.teacher)]
        return torch.stack(losses).mean()

    def clear(self) -> None:
        self.student.clear()
        self.teacher.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _reset_single_process_state() -> None:
    """Let one Python process run several distillations with different settings (notebooks, tests).

    accelerate keeps its state in a process-wide singleton that refuses a second mixed-precision setting;
    outside a distributed launch nothing else depends on it, so it is reset.
    """
    from accelerate.state import AcceleratorState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


class Distiller:
    """Holds the models, data and optimizer of one run; :meth:`run` trains to ``max_steps``."""

    def __init__(self, config: DistillConfig, accelerator: Any = None):
        from accelerate import Accelerator

        self.config = config
        config.check_output()  # nothing of the user's is clobbered, nothing is mixed with an older run
        if config.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise DistillConfigError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
        # A wrong --resume, data or teacher is reported before the (slow) teacher is loaded and before
        # anything is written.
        resume_from = checked_resume_point(config)
        self.source = open_source(
            config.data, config.caption_column, config.image_column, config.allow_missing_captions
        )
        check_some_image_readable(self.source, config.data)
        check_teacher_source(config.teacher)
        if accelerator is None:
            _reset_single_process_state()
            accelerator = Accelerator(
                cpu=not torch.cuda.is_available(),  # without it, CPU processes under `accelerate launch` run alone
                mixed_precision=config.mixed_precision,
                log_with=config.report_to,
                project_dir=str(config.output_dir),
            )
        self.accelerator = accelerator
        world = self.accelerator.num_processes
        if len(self.source) < world * config.batch_size:
            raise DataError(
                f"{len(self.source)} training images are fewer than one batch on every process "
                f"({world} x --batch-size {config.batch_size})"
            )
        self.checkpoint: Checkpoint | None = None
        if resume_from is not None:  # every file read (and checked) before the teacher is loaded
            self.checkpoint = load_checkpoint_files(resume_from, config, self.accelerator.process_index)
        self.device = self.accelerator.device
        self.weight_dtype = _weight_dtype(config.mixed_precision)

        self.pipe = load_teacher(config.teacher)
        self.pipe.set_progress_bar_config(disable=True)
        self.sdxl = is_sdxl(self.pipe)
        for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
            frozen(getattr(self.pipe, name, None), self.device, self.weight_dtype)
        self.denoiser = denoiser_of(self.pipe)
        self.vae = self.pipe.vae
        upcast = (self.sdxl or is_dit(self.pipe)) and self.vae.config.get("force_upcast", False)
        if upcast:  # the SD-XL VAE (PixArt-Sigma's too) overflows in fp16; the encoder is a small cost
            self.vae.to(torch.float32)

        self._seed_everything(config.seed)
        self.linfusion = LinFusion.from_unet(
            self.denoiser, init=config.init, projection_mid_dim=config.projection_mid_dim
        )
        self.linfusion.mount(self.denoiser)
        self.linfusion.to(dtype=torch.float32).requires_grad_(True).train()  # fp32 master weights
        if config.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.recorder = FeatureRecorder(self.linfusion.mounted_layers())

        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        optimizer = torch.optim.AdamW(
            self.linfusion.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)  # grad scaling for fp16
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_steps,
        )
        self.conditioner = text_conditioner(self.pipe, self.device, self.weight_dtype)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.accelerator.process_index)
        self.dataset = DistillDataset(self.source, config.resolution, config.random_crop, config.seed)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped_images = 0
        self.reported_unreadable: set[int] = set()  # indices already warned about

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _encode_latents(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            vae_dtype = next(self.vae.parameters()).dtype
            distribution = self.vae.encode(pixel_values.to(self.device, vae_dtype)).latent_dist
            return distribution.mean.float(), distribution.std.float()

    def build_latent_cache(self) -> None:
        """Encode every image once (fixed crops) and train on the stored latent distributions."""
        path = self.config.output_dir / "latent_cache.pt"
        key = {"teacher": self.config.teacher, "resolution": self.config.resolution, "images": len(self.source),
               "random_crop": self.config.random_crop, "seed": self.config.seed}  # fmt: skip
        cache = _read_latent_cache(path)
        if cache is None or cache.get("key") != key:
            if self.is_main:
                cache = self._encode_all(key)
                torch_save(cache, path)
            self.accelerator.wait_for_everyone()
            cache = torch.load(path, weights_only=False)
        self.dataset = CachedLatentDataset(cache)

    def _encode_all(self, key: dict[str, Any]) -> dict[str, Any]:
        shape = None
        means, stds, captions, time_ids, valid = [], [], [], [], []
        for index in tqdm(range(len(self.dataset)), desc="caching latents", disable=not self.is_main):
            item = self.dataset[index]
            if "unreadable" in item:
                self._report_unreadable(item["index"], item["unreadable"])
                valid.append(False)
                captions.append("")
                time_ids.append(torch.zeros(6, dtype=torch.long))
                means.append(None)
                stds.append(None)
                continue
            mean, std = self._encode_latents(item["pixel_values"][None])
            shape = mean.shape[1:]
            means.append(mean[0].cpu())
            stds.append(std[0].cpu())
            captions.append(item["caption"])
            time_ids.append(item["time_ids"])
            valid.append(True)
        if shape is None:
            raise ValueError("no readable image in the training data")
        means = [m if m is not None else torch.zeros(shape) for m in means]
        stds = [s if s is not None else torch.zeros(shape) for s in stds]
        return {"key": key, "mean": torch.stack(means), "std": torch.stack(stds), "caption": captions,
                "time_ids": torch.stack(time_ids), "valid": valid}  # fmt: skip

    def _report_unreadable(self, index: int, why: str) -> None:
        if index not in self.reported_unreadable:
            self.reported_unreadable.add(index)
            logger.warning("skipping unreadable image %s", why)

    def _batches(self):
        """Batches of the current epoch from ``batch_in_epoch`` on, forever across epochs.

        Once every image has proved unreadable (files that became so during the run), the run stops
        rather than looping forever.
        """
        while True:
            usable = 0
            self.dataset.set_epoch(self.epoch)
            order = epoch_order(
                len(self.dataset),
                self.epoch,
                self.config.seed,
                self.accelerator.process_index,
                self.accelerator.num_processes,
                self.config.batch_size,
            )
            batches = [
                order[i : i + self.config.batch_size] for i in range(0, len(order), self.config.batch_size)
            ]
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=batches[self.batch_in_epoch :],
                collate_fn=collate,
                num_workers=self.config.num_workers,
            )
            for batch in loader:
                self.batch_in_epoch += 1
                for index, why in batch["unreadable"].items():
                    self._report_unreadable(index, why)
                usable += "caption" in batch
                yield batch
            if not usable and len(self.reported_unreadable) == len(self.dataset):
                raise DataError(
                    f"none of the {len(self.dataset)} images of --data {self.config.data!r} can be read any "
                    "more (they were when the run started); check the files"
                )
            self.epoch += 1
            self.batch_in_epoch = 0

    # ------------------------------------------------------------------ the step
    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The three losses for one micro-batch (teacher and student on the same noisy latents)."""
        config = self.config
        captions = [
            "" if torch.rand((), generator=self.generator).item() < config.caption_dropout else caption
            for caption in batch["caption"]
        ]
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(self.device), batch["latent_std"].to(self.device)
        else:
            mean, std = self._encode_latents(batch["pixel_values"])
        sample = mean + std * torch.randn(mean.shape, generator=self.generator).to(self.device)
        shift = self.vae.config.get("shift_factor") or 0.0
        latents = (sample - shift) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=self.generator
        ).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        condition = self.conditioner(captions, batch["time_ids"])
        noisy = noisy.to(self.weight_dtype)

        self.recorder.clear()
        with torch.no_grad(), self.accelerator.autocast(), self.linfusion.original_attention():
            teacher = predict(self.denoiser, noisy, timesteps, condition)
        with self.accelerator.autocast():
            student = predict(self.denoiser, noisy, timesteps, condition)
        noise_loss = F.mse_loss(student.float(), target.float())
        kd_loss = F.mse_loss(student.float(), teacher.float())
        feat_loss = self.recorder.loss()
        w_noise, w_kd, w_feat = config.loss_weights
        total = w_noise * noise_loss + w_kd * kd_loss + w_feat * feat_loss
        return {"loss": total, "noise": noise_loss, "kd": kd_loss, "feat": feat_loss}

    def _sync_gradients(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        for parameter in self.linfusion.parameters():
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad.div_(self.accelerator.num_processes)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly, written to a temporary folder and renamed."""
        final = self.config.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        temporary = final.with_name(f".tmp-{final.name}")  # shared by every rank: each writes its RNG state
        if self.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        try:
            self._write_checkpoint(temporary, final)
        except BaseException:  # Ctrl-C or a full disk: no half-written checkpoint stays behind
            if self.is_main:
                shutil.rmtree(temporary, ignore_errors=True)
            raise
        return final

    def _write_checkpoint(self, temporary: Path, final: Path) -> None:
        self.accelerator.wait_for_everyone()
        rank = self.accelerator.process_index
        # torch_save writes through a Python file: a full disk is an OSError naming the file (torch.save
        # given a path reports it as an anonymous RuntimeError of its C++ writer)
        torch_save(
            {
                "generator": self.generator.get_state(),
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            temporary / f"rng-{rank}.pt",
        )
        if self.is_main:
            self.linfusion.save_pretrained(temporary / "linfusion")
            torch_save(self.optimizer.state_dict(), temporary / "optimizer.pt")
            torch_save(self.lr_scheduler.state_dict(), temporary / "lr_scheduler.pt")
            if self.accelerator.scaler is not None:
                torch_save(self.accelerator.scaler.state_dict(), temporary / "scaler.pt")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "skipped_images": self.skipped_images,
                "num_processes": self.accelerator.num_processes,
                "config": json.loads(self.config.to_json()),
            }
            atomic_write_text(
                temporary / "state.json", json.dumps(state, indent=2)
            )  # last: marks completeness
            replace_folder(temporary, final)
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()

    def _prune_checkpoints(self) -> None:
        limit = self.config.checkpoints_total_limit
        if not limit:
            return
        for old in complete_checkpoints(self.config.checkpoint_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _restore_rng(self, rng: dict[str, Any]) -> None:
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint`` (read by :func:`~.resume.load_checkpoint_files`) exactly."""
        path, state = checkpoint.path, checkpoint.state
        if state["num_processes"] != self.accelerator.num_processes:
            logger.warning(
                "resuming a %d-process run on %d processes: data order will differ from an uninterrupted run",
                state["num_processes"],
                self.accelerator.num_processes,
            )
        try:
            self.linfusion.load_state_dict(checkpoint.linfusion)
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.lr_scheduler.load_state_dict(checkpoint.lr_scheduler)
            if self.accelerator.scaler is not None and checkpoint.scaler is not None:
                self.accelerator.scaler.load_state_dict(checkpoint.scaler)
            if checkpoint.rng is not None:
                self._restore_rng(checkpoint.rng)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"cannot resume from {path}: its weights, optimizer or random state do not fit this run "
                f"({type(error).__name__}: {error}); resume from another checkpoint of this run, or start a new "
                "run in another --output folder"
            ) from error
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.skipped_images = state["skipped_images"]
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ export and validation
    def export(self) -> Path:
        """The final LinFusion weights at the top of the output folder (``LinFusion.from_pretrained(output)``)."""
        output = self.config.output_dir
        staging = Path(tempfile.mkdtemp(prefix=".export.", dir=output))
        try:
            self.linfusion.save_pretrained(staging)
            for name in ("config.json", "diffusion_pytorch_model.safetensors"):
                os.replace(staging / name, output / name)  # each file complete or not there
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return output

    @torch.no_grad()
    def validate(self) -> Path:
        folder = self.config.output_dir / "validation" / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        # PixArt: the exact size (no aspect-ratio binning) and the captions as trained (no cleaning).
        exact = {"use_resolution_binning": False, "clean_caption": False} if is_dit(self.pipe) else {}
        self.linfusion.eval()
        try:
            for index, prompt in enumerate(self.config.validation_prompts):
                with self.accelerator.autocast():
                    image = self.pipe(
                        prompt,
                        height=self.config.resolution,
                        width=self.config.resolution,
                        num_inference_steps=self.config.validation_steps,
                        guidance_scale=self.config.validation_guidance,
                        generator=torch.Generator(self.device).manual_seed(index),
                        **exact,
                    ).images[0]
                with atomic_file(folder / f"{index:02d}.png") as handle:
                    image.save(handle, format="PNG")
        finally:
            self.linfusion.train()
        return folder

    # ------------------------------------------------------------------ the loop
    def _start_over(self) -> None:
        """``--overwrite`` without ``--resume``: an older run's checkpoints and log must not mix in."""
        for old in complete_checkpoints(self.config.checkpoint_dir):
            shutil.rmtree(old)

    def run(self, callback: StepCallback | None = None) -> Path:
        config = self.config
        self.accelerator.wait_for_everyone()  # every rank checked --output before anything is written
        if self.is_main:
            try:
                config.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise DistillConfigError(
                    f"cannot create --output {config.output_dir}: {error.strerror or error}"
                ) from error
            if config.overwrite and not config.resume:
                self._start_over()
            atomic_write_text(config.output_dir / RUN_MARKER, config.to_json())
        if config.cache_latents:
            self.build_latent_cache()
        if self.checkpoint is not None:
            self.restore(self.checkpoint)
            self.checkpoint = None  # its tensors are in the model and optimizer now
        log_path = config.log_path
        if self.is_main:
            truncate_log(log_path, self.step)  # a resumed run logs the steps after its checkpoint again
        if config.report_to:
            self.accelerator.init_trackers("linfusion-distill", config=json.loads(config.to_json()))
        with tqdm(
            total=config.max_steps,
            initial=self.step,
            desc="distill",
            disable=not self.is_main,
            dynamic_ncols=True,
        ) as progress:  # closed on errors too: the error starts on a line of its own
            sums: dict[str, float] = {}
            micro = 0
            started = time.perf_counter()
            batches = self._batches()
            while self.step < config.max_steps:
                batch = next(batches)
                self.skipped_images += batch["skipped"]
                if "caption" not in batch:
                    continue  # a batch of unreadable images only
                losses = self.losses(batch)
                self.accelerator.backward(losses["loss"] / config.grad_accum)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.item() / config.grad_accum
                micro += 1
                if micro % config.grad_accum:
                    continue
                self._sync_gradients()
                if config.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.linfusion.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                logs = {
                    **sums,
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "skipped_images": self.skipped_images,
                }
                logs["seconds"] = time.perf_counter() - started
                sums = {}
                if self.is_main:
                    progress.update(1)
                    progress.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "noise", "kd", "feat")})
                    with open(log_path, "a") as log:
                        log.write(json.dumps({"step": self.step, **logs}) + "\n")
                if config.report_to:
                    self.accelerator.log(logs, step=self.step)
                if self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                    self.save_checkpoint()
                if config.validate_every and self.step % config.validate_every == 0 and self.is_main:
                    self.validate()
                if callback is not None:
                    callback(self.step, logs)
        if self.skipped_images:
            logger.warning("skipped %d unreadable images", self.skipped_images)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.export()
        if config.report_to:
            self.accelerator.end_training()
        self.recorder.remove()
        return config.output_dir


def _read_latent_cache(path: Path) -> dict[str, Any] | None:
    """The stored latent cache, or None when there is none or it cannot be read (it is then rebuilt)."""
    if not path.exists():
        return None
    try:
        cache = torch.load(path, weights_only=False)
    except LOAD_ERRORS as error:
        logger.warning("rebuilding the unreadable latent cache %s (%s)", path, error)
        return None
    return cache if isinstance(cache, dict) else None


def truncate_log(path: Path, step: int) -> None:
    """Keep the training log's lines of steps up to ``step`` (and drop a line a kill cut short)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # bad lines are dropped
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def distill(config: DistillConfig | dict[str, Any], callback: StepCallback | None = None) -> Path:
    """Distill LinFusion layers for ``config.teacher``; returns the output folder (a LinFusion checkpoint).

    ``callback(step, logs)`` runs after every optimizer step (and after that step's checkpoint).
    """
    if isinstance(config, dict):
        config = DistillConfig.from_dict(config)
    return Distiller(config).run(callback)
