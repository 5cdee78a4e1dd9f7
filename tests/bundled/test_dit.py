"""The committed bundled tiny DiT (a PixArtSigmaPipeline) with its distilled LinFusion weights: offline
loading with plain diffusers, fp16 files of a few MB, LinFusion modules that fit its self-attention, and
images the bundled classifier reads back as their captions."""

from __future__ import annotations

import json

import pytest
import torch

from bundled import evaluate
from linfusion import LinFusion
from linfusion.attention import GeneralizedLinearAttention
from linfusion.bundled import classifier as classifier_lib
from linfusion.bundled import shapes
from linfusion.bundled.paths import DIT_MODEL_DIR

PROMPT = "a small red circle on the left , on a white background"
GATES_N = 48
SEEDS = 8
# The teacher's gates (docs/bundled-model.md), on 48 held-out one-object captions. Its shape gate
# (found_shape >= 0.70) is met on 96 captions by a small margin (0.72; 0.71 on these 48), so the test asks
# for 0.60 there: far above chance (0.33) and the 0.36 of the DiT before its LR decays, without failing on
# one image read differently.
MET_GATES = {"background": 0.80, "found_colour": 0.70, "found_shape": 0.60}


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(str(DIT_MODEL_DIR), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def linfusion():
    return LinFusion.from_pretrained(DIT_MODEL_DIR / "linfusion").to(torch.float32)


def test_folder_is_a_pixart_sigma_pipeline_of_fp16_files_of_a_few_megabytes() -> None:
    from safetensors import safe_open

    index = json.loads((DIT_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    files = list(DIT_MODEL_DIR.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"transformer", "text_encoder", "vae", "linfusion"}
    for path in files:
        with safe_open(str(path), "pt") as tensors:
            assert all(tensors.get_tensor(key).dtype == torch.float16 for key in tensors.keys()), path  # noqa: SIM118
    total = sum(f.stat().st_size for f in DIT_MODEL_DIR.rglob("*") if f.is_file())
    assert 2 * 2**20 < total <= 8 * 2**20


def test_loads_offline_in_fp32_with_the_bundled_vae_and_scheduler(pipe) -> None:
    from linfusion.bundled import MODEL_DIR

    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert pipe.transformer.config.norm_type == "ada_norm_single" and pipe.transformer.config.patch_size == 2
    unet_vae = json.loads((MODEL_DIR / "vae" / "config.json").read_text())
    assert pipe.vae.config.scaling_factor == unet_vae["scaling_factor"]
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == 32


def test_linfusion_weights_fit_every_self_attention(pipe, linfusion) -> None:
    attn1 = {name: m for name, m in pipe.transformer.named_modules() if name.endswith("attn1")}
    assert len(attn1) == pipe.transformer.config.num_layers
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    entries = linfusion.config.modules_list
    assert sorted(entry["module_name"] for entry in entries) == sorted(attn1)
    assert all(entry["bias"] for entry in entries)  # PixArt's q/k/v have biases
    with linfusion.mount(pipe.transformer):
        for name, layer in pipe.transformer.named_modules():
            if name.endswith("attn1"):
                assert isinstance(layer, GeneralizedLinearAttention), name
                assert layer.to_q.weight.shape == (width, width) and layer.to_q.bias is not None
    assert all(pipe.transformer.get_submodule(name) is module for name, module in attn1.items())


def test_student_draws_a_small_red_circle_on_the_left(pipe, linfusion) -> None:
    """Eight seeds: at least six images read back as exactly the caption's red circle in the left slot on
    white."""
    with linfusion.mount(pipe.transformer):
        images = evaluate.generate(pipe, [PROMPT] * SEEDS, seed=0)
    assert images.shape == (SEEDS, 32, 32, 3)
    predicted = classifier_lib.predict(classifier_lib.load_classifier(), images)
    labels = shapes.scene_labels(shapes.parse_caption(PROMPT))
    left = 0
    right = (
        (predicted["background"] == labels["background"])
        & (predicted["shape"][:, left] == labels["shape"][left])  # a circle in the left slot
        & (predicted["colour"][:, left] == labels["colour"][left])  # red
        & (predicted["shape"][:, 1:] == 0).all(axis=1)  # nothing in the center or on the right
    )
    assert labels["shape"][left] > 0 and right.sum() >= SEEDS - 2, predicted


@pytest.mark.slow
def test_teacher_meets_its_gates_and_follows_the_slot(pipe) -> None:
    scores = evaluate.caption_scores(pipe, n=GATES_N)
    assert all(scores[key] >= threshold for key, threshold in MET_GATES.items()), scores
    assert scores["position"] >= 0.9, scores


@pytest.mark.slow
def test_teacher_denoises_better_with_the_prompt(pipe) -> None:
    errors = evaluate.conditioning_gap(pipe)
    for key in ("", "_t700", "_t900"):
        assert errors[f"cond{key}"] < 0.8 * errors[f"uncond{key}"], errors
