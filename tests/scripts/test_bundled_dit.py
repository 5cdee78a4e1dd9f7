"""The bundled tiny DiT's training side: its parts, the short training padding, exact resume, the export."""

import json

import pytest
import torch

from bundled import checkpoint, dit_components, dit_training


def test_training_padding_gives_the_pipelines_300_token_embeddings() -> None:
    """Training pads captions to 32 tokens; PixArtSigmaPipeline pads to 300 with a mask. With relative
    positions and masked keys, the real tokens' embeddings must be the same (else the model is trained on
    other conditioning than it is run with)."""
    from diffusers import PixArtSigmaPipeline

    tokenizer = dit_components.build_tokenizer()
    encoder = dit_components.build_text_encoder(tokenizer).eval()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=dit_components.load_vae(),
        transformer=dit_components.build_transformer(layers=1),
        scheduler=dit_components.components.build_scheduler(),
    )
    prompts = ["a small red circle on the left , on a white background", ""]
    with torch.no_grad():
        short, short_mask = dit_components.encode_prompts(tokenizer, encoder, prompts)
        long, long_mask, *_ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, clean_caption=False
        )
    assert (
        long.shape[1] == dit_components.MAX_SEQUENCE_LENGTH and short.shape[1] == dit_components.TRAIN_TOKENS
    )
    assert (
        torch.equal(long_mask[:, : short.shape[1]], short_mask) and long_mask[:, short.shape[1] :].sum() == 0
    )
    real = short_mask.bool()
    assert real.sum() == 12 + 2 + 2  # words + bos/eos each
    torch.testing.assert_close(long[:, : short.shape[1]][real], short[real], atol=1e-5, rtol=1e-5)


def test_transformer_is_pixart_shaped_with_biased_self_attention() -> None:
    transformer = dit_components.build_transformer()
    assert transformer.config.norm_type == "ada_norm_single" and transformer.config.patch_size == 2
    assert transformer.config.caption_channels == dit_components.TEXT_HIDDEN
    attn1 = [module for name, module in transformer.named_modules() if name.endswith("attn1")]
    assert len(attn1) == 6 and all(module.to_q.bias is not None for module in attn1)
    latents = torch.randn(2, 4, 16, 16)
    embeddings = torch.randn(2, 5, dit_components.TEXT_HIDDEN)
    out = dit_components.predict(transformer, latents, torch.tensor([10, 900]), embeddings, torch.ones(2, 5))
    assert out.shape == latents.shape  # out_channels 4: no learned sigma


def _config(out_dir, steps: int) -> dit_training.DitConfig:
    return dit_training.DitConfig(
        out_dir=str(out_dir),
        steps=steps,
        batch_size=2,
        layers=1,
        checkpoint_every=1,
        log_every=1,
        eval_every=2,
        eval_batch=4,
        eval_timesteps=[500],
        warmup=1,
        lr_decay_start=1,
    )


@pytest.mark.slow
def test_dit_resume_is_exact_and_the_export_loads_as_a_plain_pixart_pipeline(tmp_path) -> None:
    from diffusers import DiffusionPipeline

    dit_training.train_dit(_config(tmp_path / "a", 3))
    dit_training.train_dit(_config(tmp_path / "b", 1))
    dit_training.train_dit(_config(tmp_path / "b", 3), resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    for key in ("transformer", "text_encoder", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    records = [r for r in checkpoint.read_log(tmp_path / "b" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"eval_cond", "eval_uncond", "eval_gap"} <= set(records[1])

    folder = dit_training.export_dit(tmp_path / "b" / "checkpoint.pt", tmp_path / "model")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == torch.float32  # fp16 on disk, fp32 loaded
    exported = pipe.transformer.state_dict()
    for name, value in a["ema"].items():  # the EMA weights, rounded to fp16
        if name.startswith("transformer."):
            expected = value.to(torch.float16).float()
            assert torch.equal(exported[name.removeprefix("transformer.")], expected), name
