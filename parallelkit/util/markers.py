"""Named spans of a step for the profiled breakdown (measure/breakdown.py): profiler ranges, next to nothing
when no profiler runs."""
import torch

STEP, DATA, OPTIMIZER = "parallelkit.step", "parallelkit.data", "parallelkit.optimizer"
WAIT = "parallelkit.wait:"  # + the collective kind: a rank waiting on communication that has no work item of its own


def marker(name: str):
    return torch.profiler.record_function(name)
