"""Attention benchmark: every linear-attention backend against torch's SDPA, in one run.

For each head layout (SD-1.5: 8 heads of 40/80/160; SD-XL: 10 heads of 64), dtype, mode (forward,
forward+backward) and sequence length it records:

* the median of ``repeats`` timed runs after ``warmup`` untimed ones, for each backend and for
  ``torch.nn.functional.scaled_dot_product_attention`` (skipped, with the reason, where a call is
  predicted to exceed a cap or the run's SDPA budget is spent; the prediction extrapolates the last
  measured smaller size quadratically);
* a memory-traffic floor measured in the same run: the time of reading q, k, v and writing one output
  with a single fused element-wise op (``torch.addcmul(q, k, v)``), with a freshly allocated output as
  the op itself must, and with a preallocated one (strict); for forward+backward, plus reading q, k, v and
  the output gradient and writing three gradients (``q + g``, ``k.clone()``, ``v.clone()``);
* peak extra memory over the inputs: exact torch tensor allocations (CPU: profiler memory events; CUDA:
  ``max_memory_allocated``) and, on CPU, the peak RSS increase in a child process whose malloc returns
  large blocks to the OS (so RSS follows live memory);
* the error of each backend against the fp32 reference, and, at the largest size, the error of fp16 and
  bf16 inputs against the fp32 reference.

Results go to ``<out>/attention-<device>-<date>[-tag].{json,md,png}``.

Modules: :mod:`.config` (what to run), :mod:`.timing` (inputs, timed calls, floors), :mod:`.memory` (peaks,
the CPU child process), :mod:`.accuracy`, :mod:`.targets`, :mod:`.report` (Markdown, plot, files) and
:mod:`.run` (the run and the command's entry point).
"""

from .accuracy import half_precision_accuracy, sdpa_agreement
from .config import DTYPES, LAYOUTS, MODES, BenchConfig, config_from_args, effective_command
from .memory import memory_worker, tensor_peak_bytes_cpu
from .report import markdown_report, plot_report, write_outputs
from .run import run_benchmark, run_from_args
from .targets import TARGETS, evaluate_targets

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "MODES",
    "TARGETS",
    "BenchConfig",
    "config_from_args",
    "effective_command",
    "evaluate_targets",
    "half_precision_accuracy",
    "markdown_report",
    "memory_worker",
    "plot_report",
    "run_benchmark",
    "run_from_args",
    "sdpa_agreement",
    "tensor_peak_bytes_cpu",
    "write_outputs",
]
