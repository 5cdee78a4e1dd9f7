"""The memory planner: estimates against measured CPU peaks, saver choice, refusals with a workable budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from linfusion import LinFusion
from linfusion.cli import main
from linfusion.io import parse_size
from linfusion.patches.banded_unet import banded_unet_cost
from linfusion.patches.stage import DEFAULT_BAND_BYTES
from linfusion.pipelines import plan_stages, sdedit
from linfusion.planner import MemoryBudgetError, MemoryPlanner, Savers
from linfusion.testing import tiny_pipeline
from linfusion.tiled_vae import tiled_vae_cost
from linfusion.tracing import traced_peak

GIB = 2**30
PROBE = Path(__file__).with_name("support") / "planner_probe.py"


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("model", "size"), [("tiny", 512), ("tiny", 640), ("tiny", 768),
                                             ("bundled", 192), ("bundled", 256), ("bundled", 384)])  # fmt: skip
def test_estimate_is_within_thirty_percent_of_the_measured_cpu_peak(model: str, size: int) -> None:
    """Measured in a fresh process: the RSS high-water mark above the baseline, weights loaded.

    The high-water mark depends on the heap's history and varies between fresh processes (bundled at 192 px:
    152, 181 and 189 MB for the same estimate of 198 MB), so a measurement outside the bounds is taken twice
    more and the median of the three is compared.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def probe_once() -> dict:
        result = subprocess.run([sys.executable, str(PROBE), str(size), "100GB", model], capture_output=True,
                                text=True, timeout=300, env=env, check=True)  # fmt: skip
        return json.loads(result.stdout.strip().splitlines()[-1])

    probes = [probe_once()]
    if not 0.7 <= probes[0]["estimate"] / probes[0]["measured"] <= 1.3:
        probes += [probe_once(), probe_once()]
    probe = sorted(probes, key=lambda found: found["measured"])[len(probes) // 2]
    assert probe["savers"] == ["none needed"]
    assert 0.7 <= probe["estimate"] / probe["measured"] <= 1.3, probes


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("model", "size", "budget", "expected"),
    [
        ("bundled", 512, "300MB", "feed-forward in chunks of 4096 tokens"),
        ("tiny", 1024, "200MB", "banded UNet, activations on the device"),
    ],
)
def test_estimate_with_savers_is_within_a_quarter_of_the_measured_cpu_peak(
    model: str, size: int, budget: str, expected: str
) -> None:
    """Budgets that need savers (the banded UNet among them), in a fresh process set up
    as the command line sets itself up: glibc keeps freed memory, and a plan this tight runs with freed
    memory returned (``linfusion.app.execute.returns_freed_memory``), so the resident peak follows the plan.
    The tiled VAE through the planner (bundled model, 1024 px in 900MB: 891 MiB planned, 911 measured) was
    measured once with this probe; it takes minutes, so the suite checks the tiled VAE's cost model against
    RSS in tests/tiled_vae/test_plan.py instead."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LINFUSION_MALLOC_TUNING": "1"}
    result = subprocess.run([sys.executable, str(PROBE), str(size), budget, model], capture_output=True,
                            text=True, timeout=900, env=env, check=True)  # fmt: skip
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert expected in probe["savers"] and probe["freed_memory_returned"], probe
    assert 0.75 <= probe["estimate"] / probe["measured"] <= 1.25, probe


def test_traced_peak_counts_only_what_the_run_allocates() -> None:
    """Views, in-place and out= results of tensors made before the trace (a Linear's weight.t(), a band
    written into a preallocated store) allocate nothing; a view still keeps a traced allocation alive."""
    weight, store = torch.empty(1000, 1000, device="meta"), torch.empty(1000, 1000, device="meta")
    tokens = torch.empty(10, 1000, device="meta")
    assert traced_peak(lambda: torch.nn.functional.linear(tokens, weight)) == 10 * 1000 * 4
    assert traced_peak(lambda: store[:10].copy_(tokens)) == 0

    def view_outlives_its_base() -> torch.Tensor:
        base = torch.empty(1000, 1000, device="meta")
        view = base[:10]
        del base
        torch.empty(10, device="meta")
        return view

    assert traced_peak(view_outlives_its_base) == 1000 * 1000 * 4 + 10 * 4


def test_plan_turns_on_only_what_the_budget_needs() -> None:
    pipe = tiny_pipeline("sd15")
    LinFusion.construct_for(pipe, load_pretrained=False)
    planner = MemoryPlanner(pipe)
    weights = planner.weights()
    plain = planner.unet_activations(512, 512, Savers())
    sequential = planner.unet_activations(512, 512, Savers(sequential_cfg=True))
    assert sequential < 0.7 * plain  # one CFG branch at a time
    roomy = planner.plan([(512, 512)], budget=weights + 2 * plain)
    assert roomy.stages[0].savers == Savers()
    tight = planner.plan([(512, 512)], budget=weights + (plain + sequential) // 2)
    assert tight.stages[0].savers.sequential_cfg and not tight.stages[0].savers.feed_forward_chunk
    assert "CFG branches one at a time" in tight.describe()
    for plan in (roomy, tight):  # nothing parked on the host: nothing moved
        assert [stage["transfer_bytes"] for stage in plan.to_json()["stages"]] == [0]


@pytest.mark.slow
def test_transfer_bytes_are_what_the_cost_models_count() -> None:
    """A CUDA stage at the smallest budget parks the banded UNet's store on the host and offloads the
    models: its transfer bytes are the banded cost model's bytes per call x calls (x2 with the guidance
    branches in turn), plus the tiled VAE's decode and encode bytes when its store is on the host, plus
    every model's weights on and off the device once (the VAE twice: it encodes before the UNet)."""
    pipe = tiny_pipeline("sd15")
    LinFusion.construct_for(pipe, load_pretrained=False)
    planner = MemoryPlanner(pipe, device="cuda")
    size, calls = 1024, 3
    stage = planner.plan_stage(size, size, budget=1, encode=True, unet_calls=calls, host_budget=64 * 2**30)
    savers = stage.savers
    assert savers.banded_unet and savers.unet_store_on_host and savers.model_offload
    unet = banded_unet_cost(pipe.unet, size, size, dtype=torch.float32, batch=1 if savers.sequential_cfg else 2,
                            band_bytes=DEFAULT_BAND_BYTES, store_on_host=True,
                            device_store_bytes=savers.unet_device_store_bytes,
                            vae_scale_factor=pipe.vae_scale_factor,
                            context_tokens=pipe.tokenizer.model_max_length)  # fmt: skip
    expected = calls * (2 if savers.sequential_cfg else 1) * unet.moved_bytes
    assert savers.tiled_vae and savers.vae_store_on_host
    expected += sum(
        tiled_vae_cost(pipe.vae.config, size, size, dtype=torch.float32, band_bytes=DEFAULT_BAND_BYTES,
                       store_limit_bytes=savers.vae_store_limit_bytes, encode=encode,
                       device_store_bytes=savers.vae_device_store_bytes).moved_bytes
        for encode in (False, True)
    )  # fmt: skip

    def weights(*names: str) -> int:  # float32 parameters and buffers (the text encoder's int64 positions)
        tensors = [
            t for name in names for m in [getattr(pipe, name)] for t in [*m.parameters(), *m.buffers()]
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    expected += 2 * (weights("unet", "vae", "text_encoder") + weights("vae"))
    assert unet.moved_bytes > 0 and stage.transfer_bytes == expected
    assert stage.to_json()["transfer_bytes"] == expected


@pytest.mark.slow
def test_too_small_a_budget_is_refused_with_the_smallest_workable_one() -> None:
    pipe = tiny_pipeline("sd15")
    LinFusion.construct_for(pipe, load_pretrained=False)
    planner = MemoryPlanner(pipe)
    sizes = [(s.width, s.height) for s in plan_stages(512, 512, base_long_side=32)]
    with pytest.raises(MemoryBudgetError, match="smallest workable budget is about") as error:
        planner.plan(sizes, budget=parse_size("1MB"))
    assert "stage 5 512x512" in str(error.value)  # the plan is shown with the refusal
    named = parse_size(" ".join(str(error.value).split("smallest workable budget is about ")[1].split()[:2]))
    plain = planner.plan(sizes, budget=10**12).peak
    assert named < plain  # the savers lower the requirement
    planner.plan(sizes, budget=int(named * 1.01))  # the budget the refusal names (rounded in print) works


@pytest.mark.slow
def test_cli_refuses_before_generating(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model"
    pipe = tiny_pipeline("sd15")
    pipe.save_pretrained(folder)
    out = tmp_path / "never.png"
    code = main(["generate", "a red circle", "--model", str(folder), "--no-linfusion", "--size", "512x512",
                 "--mode", "sdedit", "--max-memory", "1MB", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 2 and not out.exists()
    assert "smallest workable budget" in capsys.readouterr().err


@pytest.mark.slow
def test_planned_chain_equals_the_unplanned_one() -> None:
    pipe = tiny_pipeline("sd15")
    LinFusion.construct_for(pipe, load_pretrained=False, init="teacher")
    planner = MemoryPlanner(pipe)
    stages = plan_stages(128, 128, base_long_side=32)
    sizes = [(s.width, s.height) for s in stages]
    minimal = planner.plan(sizes, budget=max(planner.plan_stage(w, h, budget=1).peak for w, h in sizes))
    assert minimal.stages[-1].savers.sequential_cfg  # the largest stage needs savers; small ones may not

    def chain(**kwargs):
        image = sdedit(pipe, "a red circle", 128, 128, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                       exact_vae_tiling_from=None, **kwargs)  # fmt: skip
        return np.asarray(image).astype(int)

    assert np.abs(chain(memory_plan=minimal) - chain()).max() <= 1  # savers are exact; PNG rounding aside


@pytest.mark.slow
def test_model_offload_is_the_last_resort_on_cuda_only() -> None:
    pipe = tiny_pipeline("sd15")
    LinFusion.construct_for(pipe, load_pretrained=False)
    assert not MemoryPlanner(pipe).plan_stage(256, 256, budget=1).savers.model_offload  # CPU: nothing to gain
    planner = MemoryPlanner(pipe, device="cuda")  # planning only: everything is traced on meta
    smallest = planner.plan_stage(256, 256, budget=1)
    assert smallest.savers.model_offload
    unet_part = planner.weights(("unet",)) + smallest.unet_activations
    vae_part = planner.weights(("vae",)) + smallest.vae_activations
    text_part = planner.weights(("text_encoder",))
    assert smallest.peak == max(unet_part, vae_part, text_part)
    resident = planner.weights() + max(smallest.unet_activations, smallest.vae_activations)
    assert smallest.peak < resident  # the other models' weights are off the device
    between = planner.plan([(256, 256)], budget=(smallest.peak + resident) // 2)
    assert between.stages[0].savers.model_offload and "model CPU offload" in between.describe()
    roomy = planner.plan([(256, 256)], budget=10 * resident)
    assert not roomy.stages[0].savers.model_offload


# ---------------------------------------------------------------------- diffusion transformers (PixArt)
def pixart_with_linfusion(family: str = "pixart-sigma") -> object:
    pipe = tiny_pipeline(family)
    LinFusion.construct_for(pipe, load_pretrained=False)
    return pipe


def pixart_image(pipe: object, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    return pipe(  # type: ignore[operator]
        "a red square", num_inference_steps=2, width=width, height=height, use_resolution_binning=False,
        clean_caption=False, max_sequence_length=16, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


def test_dit_plan_reads_the_caption_tokens_the_pipeline_encodes() -> None:
    """PixArt-Alpha pads captions to 120 T5 tokens, Sigma to 300: a loaded pipeline is planned for its own."""
    from linfusion.planner.measure import Measurements

    for family, tokens in (("pixart-alpha", 120), ("pixart-sigma", 300)):
        assert Measurements(tiny_pipeline(family)).context_tokens == tokens


@pytest.mark.parametrize("family", ["pixart-alpha", "pixart-sigma"])
def test_dit_plan_chooses_the_banded_dit_when_only_it_fits_and_the_image_is_unchanged(family: str) -> None:
    """The transformer's savers ladder on a PixArt pipeline: plain, CFG branches in turn, feed-forward
    chunks, then the banded DiT; the chosen savers applied on the pipeline give the same image."""
    from linfusion.patches.stage import apply_savers

    pipe = pixart_with_linfusion(family)
    planner = MemoryPlanner(pipe)
    size = (256, 192)
    options = list(planner.unet_options(*size, True, 2, room=10**12))
    assert [option.savers.banded_dit for option in options] == [False] * 3 + [True] * 2
    assert not any(option.savers.skip_offload or option.savers.banded_unet for option in options)
    smallest_plain = min(option.device for option in options[:3])
    banded = min(option.device for option in options[3:])
    assert banded < smallest_plain  # the banded DiT holds a band and the stream, not whole activations
    budget = planner.weights() + banded  # the transformer's phase fits only banded (the VAE: tiled)
    stage = planner.plan_stage(*size, budget=budget, unet_calls=2)
    assert stage.savers.banded_dit and stage.unet_activations == banded
    assert "banded DiT" in stage.savers.names()[0]
    # one band at this size: the banded cost model's FLOPs are exactly the traced call's
    assert stage.flops == stage.plain_flops
    plain = pixart_image(pipe, size)
    with apply_savers(pipe, stage.savers):
        saved = pixart_image(pipe, size)
    assert abs(saved - plain).max() < 1e-4
    assert np.array_equal(pixart_image(pipe, size), plain)


def test_dit_phases_weights_and_call_flops_on_the_full_size_structure() -> None:
    """random-pixart-sigma on meta: the transformer's share of the weights (T5-XXL's 9.5 GB are the text
    phase's), and one call's FLOPs with softmax and with LinFusion attention at 1024 px."""
    from linfusion.app.loading import load_structure

    planner = MemoryPlanner(load_structure("random-pixart-sigma", torch.float16), device="cuda")
    assert planner.weights(("transformer",)) == planner.weights(("unet", "controlnet", "transformer"))
    linfusion_mlps = 28 * 2 * (1152 * 72 + 72 + 2 * 72 + 72 * 1152 + 1152)  # C/16 MLPs on q and k
    position_table = 64 * 64 * 1152  # a buffer
    assert planner.weights(("transformer",)) == 2 * (610_856_096 + linfusion_mlps + position_table)
    assert planner.weights(("text_encoder",)) == 2 * 4_762_310_656
    softmax = planner.call_flops(1024, 1024, "softmax")
    linear = planner.call_flops(1024, 1024, "linfusion")
    tokens, width, batch, blocks = 64 * 64, 1152, 2, 28
    attention = blocks * batch * 4 * tokens**2 * width  # Q K^T and P V
    mlps = blocks * batch * 2 * 2 * tokens * 2 * width * (width // 16)  # LinFusion's q and k MLPs
    core = blocks * batch * 2 * 16 * tokens * 72 * (2 * 72 + 1)  # phi(K)^T V and every query's read
    assert softmax - linear == pytest.approx(attention - mlps - core, rel=0.01)
    assert planner.call_flops(4096, 4096, "softmax") / planner.call_flops(4096, 4096, "linfusion") > 4


@pytest.mark.slow
def test_dit_estimates_against_the_measured_cpu_peak() -> None:
    """A PixArt-Sigma-wide transformer (2 blocks, float32) at 1024 px on the CPU, each call in a fresh process:
    the traced estimate of the plain call within a quarter of the RSS peak; the banded DiT's cost model
    (32 MiB bands) above its peak, which is a fraction of the plain call's."""
    probe = Path(__file__).with_name("support") / "dit_planner_probe.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for mode in ("plain", "banded"):
        output = subprocess.run([sys.executable, str(probe), "1024", mode], capture_output=True, text=True,
                                timeout=900, env=env, check=True)  # fmt: skip
        results[mode] = json.loads(output.stdout.strip().splitlines()[-1])
    plain, banded = results["plain"], results["banded"]
    assert 0.75 <= plain["estimate"] / plain["measured"] <= 1.25, results
    assert banded["measured"] <= banded["estimate"] < 0.3 * plain["measured"], results


@pytest.mark.parametrize("family", ["sd15", "pixart-sigma"])
def test_one_rank_of_a_spatial_parallel_run_is_never_planned_banded(family: str) -> None:
    """The banded engines compute GroupNorm statistics and the attention state over the whole input they
    get: on one rank's stripe that is not the whole image, so a rank's plan offers only the plain savers."""
    pipe = tiny_pipeline(family)
    LinFusion.construct_for(pipe, load_pretrained=False)
    alone = list(MemoryPlanner(pipe).unet_options(128, 96, True, 2, room=10**12))
    rank = list(MemoryPlanner(pipe, stripes=2).unet_options(128, 96, True, 2, room=10**12))
    assert any(o.savers.banded_unet or o.savers.banded_dit for o in alone)
    assert rank and not any(o.savers.banded_unet or o.savers.banded_dit for o in rank)
    assert [o.savers for o in rank] == [o.savers for o in alone][: len(rank)]


def test_stage_plan_with_the_prompt_encoded_on_the_cpu_moves_the_text_phase_to_the_host() -> None:
    """Under model offload the text phase holds the text encoders on the device (the rest of ``weights``);
    encoded on the CPU it holds nothing there, and every model waits in host memory meanwhile."""
    from linfusion.planner import StagePlan

    def stage(savers: Savers) -> StagePlan:
        return StagePlan(64, 64, savers, weights=100, unet_activations=10, vae_activations=5, unet_weights=20,
                         vae_weights=4, unet_host=3, vae_host=1)  # fmt: skip

    offloaded = stage(Savers(model_offload=True))
    assert offloaded.text_weights == 76
    assert (offloaded.peak, offloaded.host_peak) == (76, 97)  # T5 alone; the VAE's phase parks 96 + 1
    on_cpu = stage(Savers(model_offload=True, text_encoder_on_cpu=True))
    assert (on_cpu.peak, on_cpu.host_peak) == (30, 100)  # the transformer's phase; all 100 while encoding
    assert on_cpu.to_json()["savers"] == ["model CPU offload", "prompt encoded on the CPU"]


def test_dit_plan_encodes_the_prompt_on_the_cpu_only_below_the_text_phase() -> None:
    """random-pixart-sigma for CUDA: model offload alone leaves T5-XXL's 8.9 GiB on the device while it encodes.
    A smaller budget is planned with the prompt encoded on the CPU (T5's weights not moved, counted in host
    memory); a budget above the text phase is planned as before; a UNet's plan never encodes on the CPU."""
    from linfusion.app.loading import load_structure

    planner = MemoryPlanner(load_structure("random-pixart-sigma", torch.float16), device="cuda")
    weights, text = planner.weights(), planner.weights(("text_encoder",))
    size, host = (1024, 512), 64 * GIB
    small = planner.plan_stage(*size, budget=6 * GIB, host_budget=host, unet_calls=2)
    assert small.savers.model_offload and small.savers.text_encoder_on_cpu
    assert small.peak <= 6 * GIB < text and small.text_weights == text
    # T5 and the idle transformer and VAE in host memory, plus T5's float32 copy while it encodes (float16
    # is upcast on the CPU)
    assert small.text_cpu_extra == text and small.host_peak == weights + text
    # only the transformer and the VAE go to the device and back; the VAE's phase leads the device peak
    assert small.transfer_bytes == 2 * (weights - text)
    assert small.peak == max(
        small.unet_weights + small.unet_activations, small.vae_weights + small.vae_activations
    )
    large = planner.plan_stage(*size, budget=12 * GIB, host_budget=host, unet_calls=2)
    assert not large.savers.text_encoder_on_cpu and large.peak >= text
    assert planner.plan([size], budget=6 * GIB, host_budget=host).fits
    with pytest.raises(MemoryBudgetError, match="smallest workable budget"):
        planner.plan([size], budget=6 * GIB, host_budget=weights + text - 1)  # T5 must fit in host memory
    bf16 = MemoryPlanner(load_structure("random-pixart-sigma", torch.bfloat16), device="cuda")
    kept = bf16.plan_stage(*size, budget=6 * GIB, host_budget=host, unet_calls=2)
    assert kept.savers.text_encoder_on_cpu and kept.text_cpu_extra == 0 and kept.host_peak == weights
    unet = MemoryPlanner(tiny_pipeline("sd15"), device="cuda")
    assert not unet.plan_stage(256, 256, budget=1, host_budget=host).savers.text_encoder_on_cpu
