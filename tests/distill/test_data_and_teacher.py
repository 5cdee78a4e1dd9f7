"""Distillation building blocks against independent references: text conditioning, crops, data order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from linfusion.distill.data import epoch_order, resize_and_crop
from linfusion.distill.teacher import TextConditioner
from linfusion.testing import tiny_pipeline


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_conditioning_equals_the_pipelines_own_prompt_encoding(family: str) -> None:
    pipe = tiny_pipeline(family)
    conditioner = TextConditioner(pipe, torch.device("cpu"), torch.float32)
    time_ids = torch.tensor([[32, 40, 0, 4, 32, 32], [32, 40, 0, 4, 32, 32]])
    ours = conditioner(["a red square", ""], time_ids)

    def same(actual: torch.Tensor, expected: torch.Tensor) -> None:
        # Ours encodes both captions in one batch, the pipeline one at a time: equal up to summation order.
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)

    if family == "sd15":
        positive, negative = pipe.encode_prompt("a red square", "cpu", 1, True)
        same(ours["encoder_hidden_states"][0], positive[0])
        same(ours["encoder_hidden_states"][1], negative[0])  # "" = the CFG branch
    else:
        positive, negative, pooled, negative_pooled = pipe.encode_prompt("a red square", device="cpu")
        same(ours["encoder_hidden_states"][0], positive[0])
        same(ours["added_cond_kwargs"]["text_embeds"][0], pooled[0])
        same(ours["encoder_hidden_states"][1], negative[0])  # zeros: force_zeros_for_empty_prompt
        same(ours["added_cond_kwargs"]["text_embeds"][1], negative_pooled[0])
        same(ours["added_cond_kwargs"]["time_ids"], time_ids.float())


def test_crop_keeps_the_aspect_ratio_and_reports_micro_conditioning() -> None:
    pixels = np.zeros((60, 100, 3), dtype=np.uint8)  # height 60, width 100
    pixels[:, 50:] = 255  # right half white
    image = Image.fromarray(pixels)
    crop, original, (top, left) = resize_and_crop(image, 48, np.random.default_rng(0))
    assert crop.shape == (48, 48, 3) and original == (60, 100)
    assert top == 0 and 0 <= left <= 80 - 48  # resized to 48 x 80, no warping
    resized = np.asarray(image.resize((80, 48), Image.Resampling.BICUBIC))
    assert np.array_equal(crop, resized[top : top + 48, left : left + 48])
    centred, _, (_, centre_left) = resize_and_crop(image, 48, None)
    assert centre_left == (80 - 48) // 2 and centred.shape == (48, 48, 3)


def test_epoch_order_is_a_seeded_disjoint_split() -> None:
    ranks = [epoch_order(10, epoch=1, seed=3, rank=r, world_size=2, batch_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 10 // (2 x 2) full batches of 2 per rank
    assert not set(ranks[0]) & set(ranks[1])
    assert ranks[0] == epoch_order(10, epoch=1, seed=3, rank=0, world_size=2, batch_size=2)
    assert ranks[0] != epoch_order(10, epoch=2, seed=3, rank=0, world_size=2, batch_size=2)


@pytest.mark.parametrize(
    ("pixels", "expected"),
    [
        (np.full((32, 32), 30000, dtype=np.uint16), round(30000 / 257)),  # I;16: 16-bit PNG greyscale
        (np.full((32, 32), 65535, dtype=np.uint16), 255),
        (np.full((32, 32), 30000, dtype=np.int32), round(30000 / 257)),  # I holding 16-bit data
        (np.full((32, 32), 200, dtype=np.int32), 200),  # I holding 8-bit data
        (np.full((32, 32), 0.5, dtype=np.float32), 128),  # F in [0, 1]
        (np.full((32, 32), 77, dtype=np.uint8), 77),  # L: unchanged
    ],
)
def test_high_bit_depth_images_are_scaled_by_their_range_not_clipped_white(
    tmp_path, pixels: np.ndarray, expected: int
) -> None:
    from linfusion.distill.data import load_image

    image = Image.fromarray(pixels)
    if pixels.dtype in (np.uint16, np.uint8):  # as read from a PNG file (I and F: in memory, e.g. datasets)
        image.save(tmp_path / "image.png")
        image = Image.open(tmp_path / "image.png")
    rgb = np.asarray(load_image(image))
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    assert (rgb == expected).all(), (image.mode, np.unique(rgb))


def test_a_caption_file_that_is_not_utf8_is_a_data_error(tmp_path) -> None:
    from linfusion.distill.data import DataError, read_caption_text

    (tmp_path / "caption.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match=r"caption.txt' is not UTF-8 text: byte 3 \(0xff\)"):
        read_caption_text(tmp_path / "caption.txt")


@pytest.mark.parametrize("family", ["pixart-alpha", "pixart-sigma"])
def test_pixart_conditioning_equals_the_pipelines_and_shorter_padding_changes_no_output(family: str) -> None:
    """Ours pads T5 tokens to the batch's longest caption; the pipeline pads to 120 (Alpha) / 300 (Sigma).
    On the caption's own tokens the T5 states are the pipeline's, and the transformer's prediction is the
    same: padded tokens are masked out of its cross-attention."""
    from linfusion.distill.teacher import predict, text_conditioner

    pipe = tiny_pipeline(family)
    length = {"pixart-alpha": 120, "pixart-sigma": 300}[family]
    conditioner = text_conditioner(pipe, torch.device("cpu"), torch.float32)
    assert conditioner.max_length == length
    time_ids = torch.tensor([[40, 32, 0, 4, 32, 48]] * 2)  # target size 32 x 48 (height x width)
    ours = conditioner(["  A Red Square on Green ", ""], time_ids)
    positive, positive_mask, negative, negative_mask = pipe.encode_prompt(
        "a red square on green", True, "", device="cpu", clean_caption=False, max_sequence_length=length
    )
    assert positive.shape[1] == length and ours["encoder_hidden_states"].shape[1] < 30
    for row, (states, mask) in enumerate([(positive, positive_mask), (negative, negative_mask)]):
        used = int(ours["encoder_attention_mask"][row].sum())
        assert used == int(mask.sum()) and mask[0, :used].all()  # the same tokens, then padding
        torch.testing.assert_close(
            ours["encoder_hidden_states"][row, :used], states[0, :used], rtol=1e-5, atol=1e-6
        )

    torch.manual_seed(0)
    latents = torch.randn(2, 4, 4, 6)
    timesteps = torch.tensor([999, 10])
    if family == "pixart-alpha":  # as the pipeline computes them for a 32 x 48 image
        expected_added = {
            "resolution": torch.tensor([[32.0, 48.0]] * 2),
            "aspect_ratio": torch.tensor([[32 / 48]] * 2),
        }
    else:
        expected_added = {"resolution": None, "aspect_ratio": None}
    assert ours["added_cond_kwargs"].keys() == expected_added.keys()
    for key, value in expected_added.items():
        if value is None:
            assert ours["added_cond_kwargs"][key] is None
        else:
            torch.testing.assert_close(ours["added_cond_kwargs"][key], value)
    pipeline_condition = {
        "encoder_hidden_states": torch.cat([positive, negative]),
        "encoder_attention_mask": torch.cat([positive_mask, negative_mask]),
        "added_cond_kwargs": expected_added,
    }
    with torch.no_grad():
        full = pipe.transformer(latents, timestep=timesteps, **pipeline_condition).sample
        short = predict(pipe.transformer, latents, timesteps, ours)
    assert full.shape[1] == 8 and short.shape[1] == 4  # learned sigma: the losses use the first half
    torch.testing.assert_close(short, full[:, :4], rtol=1e-5, atol=1e-5)
    # The mask matters: without it the padding would change the prediction.
    with torch.no_grad():
        unmasked = pipe.transformer(
            latents, timestep=timesteps, **{**pipeline_condition, "encoder_attention_mask": None}
        ).sample
    assert (unmasked[:, :4] - full[:, :4]).abs().max() > 1e-3


def test_teacher_names_resolve_to_the_bundled_folders_as_generate_does() -> None:
    from linfusion.bundled.paths import DIT_MODEL_DIR, MODEL_DIR
    from linfusion.distill.teacher import resolve_teacher

    assert resolve_teacher("bundled") == str(MODEL_DIR)
    assert resolve_teacher("bundled-dit") == str(DIT_MODEL_DIR)
    assert resolve_teacher("./bundled-dit") == "./bundled-dit"  # a folder of that name stays a folder
