"""Resumable training: a run interrupted and resumed equals an uninterrupted one, bit for bit."""

import json

import pytest
import torch

from bundled import checkpoint, training


def _vae_config(out_dir, steps: int) -> training.VaeConfig:
    return training.VaeConfig(
        out_dir=str(out_dir), steps=steps, batch_size=2, checkpoint_every=2, log_every=1, eval_every=2
    )


def test_vae_resume_is_exact(tmp_path) -> None:
    straight = training.train_vae(_vae_config(tmp_path / "a", 4))
    training.train_vae(_vae_config(tmp_path / "b", 2))
    resumed = training.train_vae(_vae_config(tmp_path / "b", 4), resume=True)
    a = training.load_vae(straight).state_dict()
    b = training.load_vae(resumed).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    log = checkpoint.read_log(tmp_path / "b" / "log.jsonl")
    assert [record["step"] for record in log if "loss" in record] == [1, 2, 3, 4]
    assert [(record["event"], record["step"]) for record in log if "event" in record] == [
        ("config", 0),
        ("resume", 2),
    ]
    assert "heldout_psnr" in log[-1]
    assert not list((tmp_path / "b").glob(".*tmp*"))  # atomic writes leave no temp file


@pytest.mark.slow
def test_unet_resume_is_exact_and_logs_the_conditioning_gap(tmp_path) -> None:
    vae_dir = training.train_vae(_vae_config(tmp_path / "vae", 1))

    def config(out: str, steps: int) -> training.UnetConfig:
        return training.UnetConfig(
            out_dir=str(tmp_path / out),
            vae_dir=str(vae_dir),
            steps=steps,
            batch_size=2,
            checkpoint_every=1,
            log_every=1,
            eval_every=2,
            eval_batch=4,
            eval_timesteps=[500],
            warmup=1,
            scaling_images=64,
        )

    training.train_unet(config("a", 2))
    training.train_unet(config("b", 1))
    training.train_unet(config("b", 2), resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 2
    for key in ("unet", "text_encoder", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    assert a["scaling_factor"] == b["scaling_factor"] > 0
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] == 2 and {"eval_cond", "eval_uncond", "eval_gap"} <= set(last)
    assert abs(last["eval_gap"] - (last["eval_uncond"] - last["eval_cond"])) < 1e-6

    pipe_dir = training.export_pipeline(tmp_path / "b" / "checkpoint.pt", vae_dir, tmp_path / "model")
    from bundled import components

    pipe = components.load_pipeline(pipe_dir)
    assert abs(pipe.vae.config.scaling_factor - a["scaling_factor"]) < 1e-6
