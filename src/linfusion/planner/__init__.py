"""The memory planner: estimate each stage's peak, switch on only the savers it needs, refuse early.

- :mod:`.plan`: the typed plan (:class:`PhaseCost`, :class:`StagePlan`, :class:`MemoryPlan`) and
  :class:`MemoryBudgetError` with its message;
- :mod:`.measure`: what each phase costs, measured on ``meta`` or from the banded UNet's and tiled VAE's
  cost models (:class:`Measurements`, :class:`Extrapolated`), and :func:`available_memory`;
- :mod:`.search`: :class:`MemoryPlanner`, the cheapest savers per stage within the budgets.

A plan's :class:`Savers` become patches on a pipeline with :func:`linfusion.patches.stage.apply_savers`.
"""

from ..patches.stage import Savers
from .measure import Extrapolated, Measurements, available_memory
from .plan import MemoryBudgetError, MemoryPlan, PhaseCost, StagePlan, refusal
from .search import MAX_PLANNED_PIXELS, MemoryPlanner

__all__ = [
    "MAX_PLANNED_PIXELS",
    "Extrapolated",
    "Measurements",
    "MemoryBudgetError",
    "MemoryPlan",
    "MemoryPlanner",
    "PhaseCost",
    "Savers",
    "StagePlan",
    "available_memory",
    "refusal",
]
