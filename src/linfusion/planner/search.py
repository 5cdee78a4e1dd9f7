"""The planner's search: for each stage, the cheapest savers whose device and host bytes fit the budgets.

Each phase of a stage (the UNet's calls, the VAE) has a ladder of options, cheapest first (FLOPs, then
fewer savers), measured only when asked for (:class:`~linfusion.planner.measure.Measurements`); the first
that fits is taken. Model CPU offload (CUDA only) is the last resort, then (a DiT's T5-XXL) the prompt
encoded on the CPU. When nothing fits, the closest plan is kept and
:class:`~linfusion.planner.plan.MemoryBudgetError` names the smallest workable budgets; sizes beyond any
plan are refused from an analytic lower bound before anything is traced.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from ..io import MIB, format_size
from ..patches.stage import Savers
from .measure import DENOISERS, Measurements, available_memory
from .plan import MemoryBudgetError, MemoryPlan, PhaseCost, StagePlan, refusal

# Requests larger than this (16384 x 16384) that the analytic lower bound already rules out are refused
# without planning; smaller ones are planned in full, so that the refusal names the smallest budgets.
MAX_PLANNED_PIXELS = 16384 * 16384
FEED_FORWARD_CHUNK = 4096
BANDED_MARGIN = 1024 * MIB  # device bytes kept free of a banded UNet's store (bands, library workspaces)


class MemoryPlanner(Measurements):
    """Estimates and plans for one pipeline (with or without LinFusion mounted) on one device.

    ``pipe`` may be a loaded pipeline or a structure built on ``meta`` (``app.loading.load_structure``):
    only the models' configs and parameter sizes are read, so a plan needs neither the device nor weights.
    """

    def _unet_ladder(self) -> list[Savers]:
        ladder = [Savers(), Savers(sequential_cfg=True),
                  Savers(sequential_cfg=True, feed_forward_chunk=FEED_FORWARD_CHUNK)]  # fmt: skip
        if self.device.type == "cuda" and not self.dit:  # a DiT has no skip tensors
            ladder.append(replace(ladder[-1], skip_offload=True))
        return ladder

    def unet_options(
        self, width: int, height: int, guidance: bool, calls: int, room: int
    ) -> Iterator[PhaseCost]:
        """Every way to run the stage's UNet (or DiT) calls, cheapest first, each measured only when asked for.

        First the savers of the plain model (a DiT has no skips to park); then the banded UNet or banded DiT
        (exact, bounded: its store on the device, then, on CUDA, on the host with ``room`` bytes of it kept
        on the device, then all on the host), each with the guidance branches together and one after the
        other.
        """
        flops = calls * self.unet_flops(width, height, guidance)
        for savers in self._unet_ladder():
            parked = self.skip_bytes(width, height, guidance) if savers.skip_offload else 0
            # the trace keeps the parked skips on meta: an upper bound for the device
            activations = self.unet_activations(width, height, savers, guidance)
            # each call parks its skips on the host and fetches them back
            yield PhaseCost(savers, activations, parked, flops, moved=calls * 2 * parked)
        if not self.bandable():
            return
        stores: list[int | None] = [None]  # None: the store on the device
        if self.device.type == "cuda":
            stores += [max(0, room), 0]
        for device_store_bytes in stores:
            for sequential in (False, True) if guidance else (False,):
                cost = self.banded_cost(width, height, guidance, sequential, device_store_bytes)
                savers = Savers(
                    sequential_cfg=sequential,
                    banded_unet=not self.dit,
                    banded_dit=self.dit,
                    unet_store_on_host=device_store_bytes is not None,
                    unet_device_store_bytes=device_store_bytes,
                )
                branches = 2 if sequential else 1
                yield PhaseCost(
                    savers,
                    self.with_overhead(cost.device_peak),
                    cost.host_peak,
                    calls * branches * cost.flops,
                    moved=calls * branches * cost.moved_bytes,
                )

    def vae_options(
        self, width: int, height: int, encode: bool, room: int, host_room: int | None
    ) -> Iterator[PhaseCost]:
        """Every way to run the stage's VAE decode (and encode), cheapest first.

        The plain VAE; then the exact tiled VAE (:mod:`linfusion.tiled_vae`, costed analytically): its store
        whole on the device; on CUDA in host memory (``host_room`` bytes, ``room`` of it kept on the
        device); then within ``room`` on the device, recomputing what it cannot keep (more FLOPs); then on
        CUDA within ``host_room`` alone.
        """
        yield PhaseCost(
            Savers(),
            self.vae_activations(width, height, Savers(), encode),
            0,
            self.vae_flops(width, height, encode),
        )
        stores: list[tuple[bool, int | None, int | None]] = [
            (False, None, None)
        ]  # (on host, budget, on device)
        if self.device.type == "cuda" and host_room is not None:
            stores.append((True, host_room + max(0, room), max(0, room)))
        stores.append((False, max(0, room), None))
        if self.device.type == "cuda" and host_room is not None:
            stores.append((True, host_room, 0))
        options = []
        for on_host, store_limit_bytes, on_device in stores:
            cost = self.tiled_vae_cost(width, height, encode, store_limit_bytes, on_device)
            if cost is None:
                continue
            savers = Savers(
                tiled_vae=True, vae_store_on_host=on_host, vae_store_limit_bytes=store_limit_bytes,
                vae_device_store_bytes=on_device or 0,
            )  # fmt: skip
            device, host, flops, moved = cost
            options.append(PhaseCost(savers, self.with_overhead(device), host, flops, moved))
        yield from sorted(options, key=lambda option: option.flops)  # stable: the order above on ties

    def plan_stage(
        self,
        width: int,
        height: int,
        budget: int,
        guidance: bool = True,
        encode: bool = False,
        unet_calls: int = 1,
        host_budget: int | None = None,
    ) -> StagePlan:
        """The cheapest savers that fit ``budget`` (and ``host_budget``) for one stage.

        The UNet and VAE phases are chosen apart, each the cheapest option (FLOPs, then fewer savers)
        whose device and host bytes fit. Model CPU offload (CUDA only) is the last resort: it keeps only
        the model at work on the device, at the price of moving weights every call; after it, for a DiT,
        the text encoders kept on the CPU (the prompt encoded there, slowly, so that T5-XXL never occupies
        the device). When nothing fits, the
        choice with the smallest device peak is kept, so the plan's peak is the smallest workable budget.
        """
        weights = self.weights()
        unet_weights = self.weights(DENOISERS)
        vae_weights = self.weights(("vae",))
        host_limit = host_budget if host_budget is not None and self.device.type != "cpu" else None
        plain_flops = unet_calls * self.unet_flops(width, height, guidance) + self.vae_flops(
            width, height, encode
        )

        def choose(options: Iterator[PhaseCost], resident: int, idle: int) -> PhaseCost:
            """The first (cheapest) option that fits, else the one with the smallest device bytes."""
            seen = []
            for option in options:
                host_fits = host_limit is None or option.host + idle <= host_limit
                if resident + option.device <= budget and host_fits:
                    return option
                seen.append((option, host_fits))
            within_host = [option for option, host_fits in seen if host_fits]
            return min(within_host or [option for option, _ in seen], key=lambda option: option.device)

        # (model offload, text encoders on the CPU), cheapest first; a DiT's T5-XXL alone can outgrow the device
        modes = [(False, False)]
        if self.device.type == "cuda":
            modes += [(True, False), (True, True)] if self.dit else [(True, False)]
        text_weights = weights - unet_weights - vae_weights
        best: StagePlan | None = None
        for offload, text_on_cpu in modes:
            unet_resident = unet_weights if offload else weights
            unet = choose(
                self.unet_options(
                    width, height, guidance, unet_calls, budget - unet_resident - BANDED_MARGIN
                ),
                unet_resident,
                weights - unet_weights if offload else 0,
            )
            vae_resident = vae_weights if offload else weights
            vae_idle = weights - vae_weights if offload else 0
            vae = choose(
                self.vae_options(
                    width,
                    height,
                    encode,
                    budget - vae_resident - BANDED_MARGIN,
                    None if host_limit is None else host_limit - vae_idle - BANDED_MARGIN,
                ),
                vae_resident,
                vae_idle,
            )
            savers = replace(
                unet.savers,
                tiled_vae=vae.savers.tiled_vae,
                vae_store_on_host=vae.savers.vae_store_on_host,
                vae_store_limit_bytes=vae.savers.vae_store_limit_bytes,
                vae_device_store_bytes=vae.savers.vae_device_store_bytes,
                model_offload=offload,
                text_encoder_on_cpu=text_on_cpu,
            )
            # model CPU offload brings each model onto the device and back once per stage (the VAE twice
            # when it also encodes, before and after the UNet; the text encoders not when kept on the CPU)
            moved_weights = weights - (text_weights if text_on_cpu else 0) + (vae_weights if encode else 0)
            offloaded = 2 * moved_weights if offload else 0
            stage = StagePlan(
                width, height, savers, weights, unet.device, vae.device, unet_weights, vae_weights,
                unet.host, vae.host, unet.flops + vae.flops, plain_flops, unet.moved + vae.moved + offloaded,
                self.cpu_encode_extra_bytes() if text_on_cpu else 0,
            )  # fmt: skip
            host_fits = host_limit is None or stage.host_peak <= host_limit
            if stage.peak <= budget and host_fits:
                return stage
            if best is None or stage.peak < best.peak:
                best = stage
        assert best is not None
        return best

    def plan(
        self,
        sizes: Sequence[tuple[int, int]],
        budget: int | None = None,
        guidance: bool = True,
        encodes: Sequence[bool] | None = None,
        host_budget: int | None = None,
        unet_calls: Sequence[int] | None = None,
        refuse: bool = True,
    ) -> MemoryPlan:
        """Plan every stage; with ``refuse`` raise :class:`MemoryBudgetError` before anything runs if one
        cannot fit (the message names the smallest budgets that would).

        ``budget`` and ``host_budget`` are bytes (``host_budget`` None: host memory not limited). Without
        ``budget``: the device's free memory plus the weights already loaded on it. ``unet_calls``
        counts each stage's UNet calls (denoising steps, twice for DemoFusion's dilated branch) for FLOPs.
        """
        budget = available_memory(self.device) + self.weights() if budget is None else budget
        host = host_budget
        encodes = list(encodes) if encodes is not None else [False] * len(sizes)
        calls = list(unet_calls) if unet_calls is not None else [1] * len(sizes)
        if refuse:  # a size beyond any plan is refused in milliseconds, before any trace
            # Up to 16K the full plan takes seconds, and its refusal names the smallest workable budgets.
            available = budget + (host or 0 if self.device.type != "cpu" else 0)
            for (width, height), encode in zip(sizes, encodes):
                if width * height <= MAX_PLANNED_PIXELS:
                    continue
                needed = self.minimum_bytes(width, height, encode)
                if needed > available:
                    where = "device and host memory" if self.device.type != "cpu" else "memory"
                    raise MemoryBudgetError(
                        f"{width}x{height} needs at least {format_size(needed)} of {where} whatever the savers "
                        f"(the weights, the smallest store of the exact tiled VAE and the image itself); the "
                        f"budget is {format_size(available)}: choose a smaller size"
                    )
        stages = tuple(
            self.plan_stage(width, height, budget, guidance, encode, call_count, host)
            for (width, height), encode, call_count in zip(sizes, encodes, calls)
        )
        plan = MemoryPlan(budget, self.device, stages, host if self.device.type != "cpu" else None)
        if refuse and not plan.fits:
            raise MemoryBudgetError(refusal(plan), plan)
        return plan


__all__ = ["BANDED_MARGIN", "FEED_FORWARD_CHUNK", "MAX_PLANNED_PIXELS", "MemoryPlanner"]
