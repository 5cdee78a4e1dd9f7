"""``LinFusion``: the container of every replacement ``attn1`` layer, and reversible mounting.

Mounting replaces modules (as the published project does) rather than installing attention processors,
so the published state dicts load unchanged. Every replaced original is kept, and :meth:`LinFusion.unmount`
puts the very same objects back, so the UNet computes bit-identically what it computed before.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import GeneralizedLinearAttention
from .errors import UserError
from .hub import load_failure_message
from .io import disk_full_behind, umask_mode_for_new_files
from .patches.base import Patch, PatchOrderError, replace_submodule, set_attribute
from .registry import (
    SUPPORTED_DENOISERS,
    attention_has_bias,
    attention_signature,
    attention_width_and_heads,
    check_linearizable,
    is_dit,
    is_sdxl,
    is_self_attention,
    resolve_checkpoint,
)

logger = logging.getLogger(__name__)

_MOUNTED_ATTR = "_linfusion_mounted"
_LEGACY_CLASS_NAMES = {"LinFusion", "StableMamba"}
_LOAD_CONFIG_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "local_files_only",
    "revision",
    "subfolder",
)


class LinFusionCheckpointError(UserError, ValueError):
    """A LinFusion checkpoint is missing, unreadable, or does not fit the model it is mounted on."""


class NotAUNetError(UserError, TypeError):
    """A LinFusion method was given something other than a denoiser module (``None``, a pipeline, a path)."""


def require_module(unet: Any, method: str) -> None:
    """Raise :class:`NotAUNetError` naming ``method`` unless ``unet`` is a torch module."""
    if not isinstance(unet, nn.Module):
        if hasattr(unet, "unet"):
            hint = " (a pipeline's is pipe.unet)"
        elif hasattr(unet, "transformer"):
            hint = " (a pipeline's is pipe.transformer)"
        else:
            hint = ""
        raise NotAUNetError(
            f"LinFusion.{method} needs the UNet or transformer module{hint}; got {type(unet).__name__}"
        )


@dataclass
class _Mount:
    root: nn.Module
    path: str
    original: nn.Module
    replacement: GeneralizedLinearAttention


def _normalize_entry(entry: Any) -> dict[str, Any]:
    """One ``modules_list`` entry in the published dict form; the legacy ``[name, dim_n, heads]`` too."""
    if isinstance(entry, (list, tuple)):
        if len(entry) < 3:
            raise LinFusionCheckpointError(
                f"legacy modules_list entry {entry!r} needs [module_name, dim_n, heads]"
            )
        entry = {"module_name": entry[0], "dim_n": entry[1], "heads": entry[2]}
    if not isinstance(entry, dict) or not {"module_name", "dim_n", "heads"} <= set(entry):
        raise LinFusionCheckpointError(
            f"modules_list entry {entry!r} needs module_name, dim_n and heads (and optionally projection_mid_dim)"
        )
    normalized = {
        "module_name": str(entry["module_name"]),
        "dim_n": int(entry["dim_n"]),
        "heads": int(entry["heads"]),
        "projection_mid_dim": entry.get("projection_mid_dim"),
    }
    if entry.get("bias"):  # written only when true, so UNet checkpoints keep the published layout
        normalized["bias"] = True
    return normalized


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _is_controlnet(model: nn.Module) -> bool:
    return "ControlNet" in type(model).__name__


def denoiser_of(pipeline: Any) -> nn.Module:
    """A pipeline's denoiser: its ``unet`` (Stable Diffusion) or its ``transformer`` (PixArt).

    Raises :class:`NotAUNetError` saying what the pipeline has instead (no denoiser, a ``transformer``
    slot left empty, not a pipeline at all).
    """
    for name in ("unet", "transformer"):
        model = getattr(pipeline, name, None)
        if isinstance(model, nn.Module):
            return model
    slots = [name for name in ("unet", "transformer") if hasattr(pipeline, name)]
    if slots:
        raise NotAUNetError(
            f"the {type(pipeline).__name__} has no {slots[0]} (it is None): load the pipeline with its "
            f"{slots[0]} before mounting LinFusion"
        )
    raise NotAUNetError(
        f"cannot mount LinFusion on {type(pipeline).__name__}: pass a diffusers pipeline with a `unet` or a "
        f"`transformer`, or the model itself. Supported: {SUPPORTED_DENOISERS}"
    )


def _model_targets(target: Any, controlnet: bool | None) -> list[nn.Module]:
    """The models to act on: a pipeline's denoiser, plus its ControlNets when ``controlnet`` is True (or,
    when None, whenever the pipeline has them), or the model given."""
    if isinstance(target, nn.Module) and not hasattr(target, "components"):
        return [target]
    targets = [denoiser_of(target)]
    nets = getattr(target, "controlnet", None)
    if controlnet and nets is None:
        raise ValueError("controlnet=True but the pipeline has no `controlnet` component")
    if controlnet is not False and nets is not None:
        targets.extend(getattr(nets, "nets", [nets]))
    return targets


def mounted_on(model: nn.Module) -> LinFusion | None:
    """The LinFusion whose layers ``model`` (a UNet or ControlNet) runs now, or None.

    The record is a plain instance attribute (set bypassing ``nn.Module.__setattr__``, which would register
    the container as a submodule: its weights would then appear twice in the UNet's state dict and to PEFT).
    """
    return model.__dict__.get(_MOUNTED_ATTR)


def _current_original(root: nn.Module, path: str) -> nn.Module:
    """The diffusers ``attn1`` at ``path``, looking through a LinFusion layer that is mounted there."""
    module = root.get_submodule(path)
    mounted = mounted_on(root)
    if isinstance(module, GeneralizedLinearAttention) and mounted is not None:
        for mount in mounted._mounts:
            if mount.root is root and mount.path == path:
                return mount.original
    return module


def _resolve_unet(pipeline: Any, unet: nn.Module | None) -> nn.Module:
    if unet is not None:
        return unet
    if pipeline is None:
        raise ValueError(
            "pass a diffusers pipeline (pipeline=...) or its denoiser itself (unet=... or transformer=...)"
        )
    return denoiser_of(pipeline)


def _default_mid_dim(unet: nn.Module, width: int, projection_mid_dim: int | str | None) -> int | None:
    """As published: None (= C) for SD-1.x/2.x-shaped UNets, C/16 for SD-XL-shaped ones; C/16 for PixArt
    too (C = 1152 in 28 blocks: full-width MLPs would add a quarter to the transformer's weights)."""
    if projection_mid_dim != "auto":
        return projection_mid_dim  # type: ignore[return-value]
    return max(1, width // 16) if is_sdxl(unet) or is_dit(unet) else None


class LinFusion(ModelMixin, ConfigMixin):
    """All of a UNet's replacement ``attn1`` layers, saved and loaded in the published layout.

    ``config.json`` holds ``modules_list`` (one entry per layer: ``module_name``, ``dim_n``, ``heads``,
    ``projection_mid_dim``); the state dict keys are ``{i}.to_q.weight`` ... with ``i`` the entry's index.

    Typical use::

        linfusion = LinFusion.construct_for(pipe)   # resolve published weights, load, mount
        image = pipe(prompt).images[0]
        linfusion.unmount()                          # the original attention is back
    """

    @register_to_config
    def __init__(self, modules_list: list[Any]) -> None:
        super().__init__()
        entries = [_normalize_entry(entry) for entry in modules_list]
        self.register_to_config(modules_list=entries)
        for index, entry in enumerate(entries):
            layer = GeneralizedLinearAttention(
                entry["dim_n"], entry["heads"], entry["projection_mid_dim"], bias=entry.get("bias", False)
            )
            self.add_module(str(index), layer)
        self._mounts: list[_Mount] = []
        self._handles: list[tuple[nn.Module, Patch]] = []

    # ------------------------------------------------------------------ building and loading
    @property
    def modules_dict(self) -> dict[str, GeneralizedLinearAttention]:
        """UNet module path -> replacement layer, in checkpoint order."""
        return {
            entry["module_name"]: self.get_submodule(str(index))
            for index, entry in enumerate(self.config.modules_list)
        }

    @classmethod
    def default_config(
        cls, unet: nn.Module, projection_mid_dim: int | str | None = "auto"
    ) -> dict[str, list[dict[str, Any]]]:
        """The ``modules_list`` for every ``attn1`` of ``unet`` (a UNet or a PixArt transformer; published
        conventions for the MLP width; ``bias`` where the original q/k/v have biases)."""
        require_module(unet, "default_config")
        check_linearizable(unet)
        modules_list = []
        for path, width, heads in attention_signature(unet):
            mid = _default_mid_dim(unet, width, projection_mid_dim)
            entry = {"module_name": path, "dim_n": width, "heads": heads, "projection_mid_dim": mid}
            if attention_has_bias(_current_original(unet, path)):
                entry["bias"] = True
            modules_list.append(entry)
        return {"modules_list": modules_list}

    @classmethod
    def get_default_config(cls, pipeline: Any = None, unet: nn.Module | None = None) -> dict[str, Any]:
        """Reference-project name for :meth:`default_config` (takes a pipeline or a UNet)."""
        return cls.default_config(_resolve_unet(pipeline, unet))

    @classmethod
    def from_transformer(
        cls, transformer: nn.Module, init: str = "random", projection_mid_dim: int | str | None = "auto"
    ) -> LinFusion:
        """Untrained layers for a diffusion transformer (PixArt-Alpha / PixArt-Sigma), as :meth:`from_unet`.

        Transformers whose attention cannot be linearized (SD3, FLUX: joint with the text; SANA: already
        linear) raise :class:`~linfusion.registry.UnsupportedModelError` saying why.
        """
        return cls.from_unet(transformer, init=init, projection_mid_dim=projection_mid_dim)

    @classmethod
    def from_unet(
        cls, unet: nn.Module, init: str = "random", projection_mid_dim: int | str | None = "auto"
    ) -> LinFusion:
        """Untrained layers for ``unet`` (or any supported denoiser), on its device and dtype.

        ``init="random"`` is the reference behaviour; ``init="teacher"`` copies each original ``attn1``'s
        q/k/v(/biases)/out projections and zeroes the MLPs' last Linear, so training starts from the teacher.
        """
        require_module(unet, "from_unet")
        if init not in ("random", "teacher"):
            raise ValueError(f"init must be 'random' or 'teacher'; got {init!r}")
        config = cls.default_config(unet, projection_mid_dim)
        parameter = next(unet.parameters(), None)
        with torch.device(parameter.device if parameter is not None else "cpu"):
            linfusion = cls(**config)
        _place_like(linfusion, parameter)
        if init == "teacher":
            for path, layer in linfusion.modules_dict.items():
                layer.init_from_attention(_current_original(unet, path))
        return linfusion

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> LinFusion:
        """Load published or saved LinFusion weights (Hub id or local folder); accepts ``torch_dtype``.

        Checks first that the folder really is a LinFusion checkpoint, and turns Hub/file errors into
        one message that says what to do.
        """
        source = str(pretrained_model_name_or_path)
        load_kwargs = {key: kwargs[key] for key in _LOAD_CONFIG_KWARGS if key in kwargs}
        try:
            config = cls.load_config(source, **load_kwargs)
        except (OSError, ValueError) as error:
            raise LinFusionCheckpointError(_load_failure(source, error)) from error
        class_name = config.get("_class_name")
        if "modules_list" not in config or (class_name is not None and class_name not in _LEGACY_CLASS_NAMES):
            raise LinFusionCheckpointError(
                f"{source!r} is not a LinFusion checkpoint: its config.json has _class_name {class_name!r} "
                f"and {'a' if 'modules_list' in config else 'no'} 'modules_list'. Pass the folder or Hub id "
                "of LinFusion weights (e.g. 'Yuanshi/LinFusion-1-5'), not the base model."
            )
        try:
            return super().from_pretrained(source, **kwargs)
        except OSError as error:
            raise LinFusionCheckpointError(_load_failure(source, error)) from error

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained`` (the published layout); the files get the umask's mode, as
        every file linfusion writes does (safetensors alone would make the weights ``0600``). A full disk is
        an :class:`OSError` naming the folder (safetensors reports it as its own error)."""
        try:
            with umask_mode_for_new_files(save_directory):
                super().save_pretrained(save_directory, **kwargs)
        except Exception as error:
            full = disk_full_behind(error, save_directory)
            if full is not None and full is not error:
                raise full from None
            raise

    @classmethod
    def construct_for(
        cls,
        pipeline: Any = None,
        unet: nn.Module | None = None,
        load_pretrained: bool = True,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        pipe_name_path: str | None = None,
        *,
        transformer: nn.Module | None = None,
        init: str = "random",
        projection_mid_dim: int | str | None = "auto",
        controlnet: bool = False,
        **from_pretrained_kwargs: Any,
    ) -> LinFusion:
        """Build or load LinFusion for a pipeline (or UNet) and mount it; the reference project's entry point.

        Works the same on PixArt pipelines (``pipe.transformer``, or ``transformer=``). With
        ``load_pretrained`` the weights are ``pretrained_model_name_or_path`` when given (it always wins),
        else resolved from the pipeline's model id or the UNet's architecture (see
        :mod:`linfusion.registry`; no weights are published for transformers: distill them). Without it,
        untrained layers are built (``init``, ``projection_mid_dim``). Nothing in the model changes unless
        every check passes.
        """
        unet = _resolve_unet(pipeline, unet if unet is not None else transformer)
        check_linearizable(unet)
        if load_pretrained:
            source = pretrained_model_name_or_path
            if source is None:
                model_ids = [pipe_name_path, _name_or_path(pipeline), _name_or_path(unet)]
                source, reason = resolve_checkpoint(unet, model_ids)
                logger.info("LinFusion: using %s (matched by %s)", source, reason)
            linfusion = cls.from_pretrained(source, **from_pretrained_kwargs)
        else:
            linfusion = cls.from_unet(unet, init=init, projection_mid_dim=projection_mid_dim)
        target = pipeline if pipeline is not None else unet
        linfusion.mount(target, controlnet=controlnet)
        return linfusion

    # ------------------------------------------------------------------ mounting
    def check_fits(self, model: nn.Module) -> None:
        """Raise :class:`LinFusionCheckpointError` naming the first layer that does not fit ``model``.

        A UNet must have exactly the checkpoint's ``attn1`` layers; a ControlNet (a copy of the UNet's
        encoder) must have a subset of them.
        """
        check_linearizable(model)
        expected = {entry["module_name"]: entry for entry in self.config.modules_list}
        partial = _is_controlnet(model)
        for path, entry in expected.items():
            if not _has_submodule(model, path):
                if partial:
                    continue
                raise LinFusionCheckpointError(
                    f"LinFusion checkpoint does not fit this {type(model).__name__}: module {path!r} "
                    "is missing from the model (is this checkpoint for another base model?)"
                )
            original = _current_original(model, path)
            if not is_self_attention(path, original):
                raise LinFusionCheckpointError(
                    f"LinFusion checkpoint does not fit: {path!r} is a {type(original).__name__}, "
                    "not a self-attention layer"
                )
            width, heads = attention_width_and_heads(original)
            if (width, heads) != (entry["dim_n"], entry["heads"]):
                raise LinFusionCheckpointError(
                    f"LinFusion checkpoint does not fit: module {path!r} has width {width} and {heads} heads "
                    f"in the model but width {entry['dim_n']} and {entry['heads']} heads in the checkpoint"
                )
            if attention_has_bias(original) != bool(entry.get("bias", False)):
                found = "has" if attention_has_bias(original) else "has no"
                raise LinFusionCheckpointError(
                    f"LinFusion checkpoint does not fit: module {path!r} {found} q/k/v biases in the model but "
                    f"the checkpoint's layer was built {'with' if entry.get('bias') else 'without'} them "
                    "(is this checkpoint for a UNet and the model a transformer, or the other way round?)"
                )
        uncovered = [path for path, _, _ in attention_signature(model) if path not in expected]
        if uncovered:
            raise LinFusionCheckpointError(
                f"LinFusion checkpoint does not fit this {type(model).__name__}: self-attention {uncovered[0]!r} "
                f"(and {len(uncovered) - 1} more) has no LinFusion layer in the checkpoint"
            )

    def mount(self, target: Any, controlnet: bool = False) -> Patch:
        """Replace the ``attn1`` layers of a pipeline's UNet (or of the UNet/ControlNet given).

        Returns a :class:`~linfusion.patches.Patch`: its ``remove()`` (or leaving a ``with`` block) puts
        back exactly what this call replaced; :meth:`unmount` removes every mount of this LinFusion.
        ``controlnet=True`` also mounts on the pipeline's ControlNet(s), with copies of the UNet layers of
        the same paths (copies, so that model CPU offload can move each model on its own). Mounting twice
        changes nothing the second time. Mounting over another LinFusion stacks on it: removing this mount
        brings the other one back. All checks run before any module is replaced.
        """
        models = _model_targets(target, controlnet)
        for model in models:
            self.check_fits(model)
        patch = Patch("LinFusion mounted")
        for model in models:
            if mounted_on(model) is not self:
                patch.add(self._mount_model(model))
        return patch

    mount_to = mount  # name used by the reference project

    def _mount_model(self, model: nn.Module) -> Patch:
        parameter = next(model.parameters(), None)
        if not _is_controlnet(model):
            _place_like(self, parameter)
        patch = Patch(f"LinFusion on {type(model).__name__}")
        # Bookkeeping is registered before each change, so it is undone only after the change was.
        self._handles.append((model, patch))
        patch.on_remove(lambda: self._handles.remove((model, patch)))
        replacements: list[nn.Module] = []

        def drop_lora() -> None:  # registered before the replacements: runs once the originals are back
            for replacement in replacements:
                remove_adapters(replacement)

        patch.on_remove(drop_lora)
        for path, layer in self.modules_dict.items():
            if not _has_submodule(model, path):
                continue  # a ControlNet covers only the encoder paths
            replacement = layer
            if _is_controlnet(model):
                replacement = copy.deepcopy(layer)
                _place_like(replacement, parameter)
            replacements.append(replacement)
            mount = _Mount(model, path, _current_original(model, path), replacement)
            self._mounts.append(mount)
            patch.on_remove(lambda mount=mount: self._mounts.remove(mount))

            def restore_where_the_model_went(
                previous: nn.Module, replacement: nn.Module = replacement
            ) -> None:
                _place_like(previous, next(replacement.parameters(), None))

            patch.add(replace_submodule(model, path, replacement, on_restore=restore_where_the_model_went))
        patch.add(set_attribute(model, _MOUNTED_ATTR, self, "LinFusion marker"))
        return patch

    def unmount(self, target: Any = None) -> None:
        """Put the original ``attn1`` layers back (all models, or only those of ``target``).

        LoRA (PEFT) layers loaded onto the LinFusion layers while they were mounted belong to that mount:
        removing the mount (this, or ``handle.remove()``) takes them off (fused weights are unfused
        first), so the LinFusion layers are as they were when mounted, and a later mount starts without
        them. The LoRA's other layers (cross-attention, feed-forward, ...) stay on the UNet until
        ``unload_lora_weights()``.
        """
        roots = None if target is None else {id(m) for m in _model_targets(target, controlnet=None)}
        for model, patch in list(reversed(self._handles)):
            if roots is not None and id(model) not in roots:
                continue
            try:
                patch.remove()
            except PatchOrderError as error:
                raise PatchOrderError(
                    f"another LinFusion (or patch) was mounted on this {type(model).__name__} after this one; "
                    "unmount that one first"
                ) from error

    @property
    def is_mounted(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def original_attention(self) -> Iterator[None]:
        """Temporarily put the original ``attn1`` layers back (the teacher), then LinFusion again.

        Distillation runs the teacher and the student through one UNet this way, so no second copy of the
        UNet is needed. Cheap (no checks), and the LinFusion layers return even if the body raises.
        """
        for mount in self._mounts:
            _set_submodule(mount.root, mount.path, mount.original)
        try:
            yield
        finally:
            for mount in self._mounts:
                _set_submodule(mount.root, mount.path, mount.replacement)

    def mounted_layers(self) -> list[tuple[GeneralizedLinearAttention, nn.Module]]:
        """(LinFusion layer, original ``attn1``) pairs of the UNet mount, in checkpoint order."""
        return [(m.replacement, m.original) for m in self._mounts if not _is_controlnet(m.root)]


def remove_adapters(layer: nn.Module) -> None:
    """Take the LoRA (PEFT) wrappers off ``layer``'s submodules, unfusing fused ones first."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft, diffusers cannot have loaded a LoRA
        return
    for path, module in list(layer.named_modules()):
        if path and isinstance(module, BaseTunerLayer):
            if module.merged:
                module.unmerge()
            _set_submodule(layer, path, module.get_base_layer())


def _place_like(module: nn.Module, reference: torch.Tensor | None) -> None:
    """Move ``module`` to ``reference``'s device and dtype, only when it is elsewhere.

    Used to put LinFusion layers where the UNet lives, and a restored original where the UNet has moved
    to meanwhile. Moving only when needed avoids needless copies (and diffusers' dtype-cast warning).
    """
    current = next(module.parameters(), None)
    if reference is None or current is None:
        return
    if current.device != reference.device or current.dtype != reference.dtype:
        module.to(device=reference.device, dtype=reference.dtype)


def _name_or_path(obj: Any) -> str | None:
    config = getattr(obj, "config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get("_name_or_path")
    return getattr(config, "_name_or_path", None)


def _load_failure(source: str, error: Exception) -> str:
    needs = "config.json and diffusion_pytorch_model.safetensors (as save_pretrained writes)"
    return load_failure_message("LinFusion weights", source, error, needs)
