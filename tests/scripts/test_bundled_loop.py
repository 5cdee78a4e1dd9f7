"""The loop shared by the bundled UNet and DiT stages: LR schedule, resumable state, a resumed run's LR."""

import math

import pytest
import torch

from bundled import checkpoint, dit_training, loop


def _config(**changes) -> dit_training.DitConfig:
    return dit_training.DitConfig(
        **{"out_dir": "unused", "steps": 100, "warmup": 10, "lr_decay_start": 50, **changes}
    )


def test_lr_factor_warms_up_then_decays_to_the_final_ratio_on_a_cosine() -> None:
    config = _config(lr_final_ratio=0.1)
    assert loop.lr_factor(0, config) == pytest.approx(0.1)
    assert loop.lr_factor(9, config) == loop.lr_factor(49, config) == 1.0
    assert loop.lr_factor(75, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert loop.lr_factor(100, config) == pytest.approx(0.1)
    assert loop.lr_factor(75, _config(lr_decay_start=-1)) == 1.0


def test_restore_run_brings_back_what_save_run_wrote(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_run(path, {"model": model}, optimizer, generator, 7, config={"seed": 5})
    expected_draw = torch.rand(4, generator=generator)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    state = checkpoint.load(path)
    assert list(state) == ["model", "optimizer", "rng", "step", "config"]  # the layout of older checkpoints
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_generator = torch.Generator().manual_seed(0)
    assert checkpoint.restore_run(state, {"model": fresh}, fresh_optimizer, fresh_generator) == 7
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    assert torch.equal(torch.rand(4, generator=fresh_generator), expected_draw)


@pytest.mark.slow
def test_a_resumed_run_takes_the_lr_asked_for_now(tmp_path) -> None:
    def config(steps: int, lr: float) -> dit_training.DitConfig:
        return dit_training.DitConfig(
            out_dir=str(tmp_path),
            steps=steps,
            batch_size=1,
            layers=1,
            lr=lr,
            text_lr=lr / 2,
            warmup=1,
            lr_decay_start=-1,
            checkpoint_every=1,
            log_every=1,
            eval_every=10,
            eval_batch=1,
            eval_timesteps=[500],
        )

    dit_training.train_dit(config(1, 4e-4))
    dit_training.train_dit(config(2, 1e-4), resume=True)
    groups = checkpoint.load(tmp_path / loop.CHECKPOINT)["optimizer"]["param_groups"]
    assert [(group["base_lr"], group["lr"]) for group in groups] == [(1e-4, 1e-4), (5e-5, 5e-5)]
    records = checkpoint.read_log(tmp_path / "log.jsonl")
    assert [(r.get("event"), r["step"], r.get("lr")) for r in records] == [
        ("config", 0, 4e-4),  # the config's lr
        (None, 1, 4e-4),
        ("resume", 1, 1e-4),
        (None, 2, 1e-4),
    ]
