"""The bundled model's parts: real diffusers classes, a word-level tokenizer, an offline round trip."""

import json

import numpy as np
import torch

from bundled import components
from linfusion.bundled import shapes


def test_tokenizer_gives_one_token_per_caption_word() -> None:
    tokenizer = components.build_tokenizer()
    for word in shapes.vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word  # bos, word, eos
    longest = max((shapes.scene_for_seed(seed, 3).caption() for seed in range(50)), key=len)
    ids = tokenizer(longest).input_ids
    assert len(ids) == len(longest.split()) + 2 <= tokenizer.model_max_length


def test_text_encoder_covers_the_tokenizer() -> None:
    tokenizer = components.build_tokenizer()
    encoder = components.build_text_encoder(tokenizer)
    assert encoder.config.vocab_size >= len(tokenizer)
    assert encoder.config.max_position_embeddings >= tokenizer.model_max_length
    assert encoder.config.eos_token_id == tokenizer.eos_token_id


def test_unet_has_self_attention_at_two_levels_or_more() -> None:
    unet = components.build_unet()
    attn1 = [name for name, _ in unet.named_modules() if name.endswith("attn1")]
    down_levels = {name.split(".")[1] for name in attn1 if name.startswith("down_blocks.")}
    assert len(down_levels) >= 2
    assert any(name.startswith("mid_block.") for name in attn1)
    assert components.count_parameters(unet) * 2 < 16e6  # fp16 bytes: well under the 20 MB budget


def test_pipeline_round_trip_offline(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = components.build_pipeline(seed=3)
    folder = components.save_pipeline(pipe, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    weights = sorted(folder.rglob("*.safetensors"))
    assert len(weights) == 3
    assert sum(path.stat().st_size for path in weights) < 20e6

    loaded = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.dtype == loaded.text_encoder.dtype == torch.float32
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    prompt = shapes.scene_for_seed(0).caption()
    image = loaded(prompt, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, components.IMAGE_SIZE, components.IMAGE_SIZE, 3)
    assert np.isfinite(image).all()
    big = loaded(prompt, num_inference_steps=2, height=64, width=48, output_type="np").images
    assert big.shape == (1, 64, 48, 3)
    # fp16 on disk: the loaded weights equal the originals rounded to fp16
    original = pipe.unet.conv_in.weight.detach().half().float()
    assert torch.equal(loaded.unet.conv_in.weight.detach(), original)
