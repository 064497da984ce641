"""The parallel layout of a run: one frozen object, computed once from the config.

Every consumer (config checks, the loop's data sampler, the summary, the estimator) reads
the same ``Layout``; a strategy only says its tp and pp degrees and whether one process
drives every device.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from .config import ConfigError


@dataclass(frozen=True)
class Layout:
    world: int  # devices the model runs on
    dp: int  # data-parallel replicas
    tp: int = 1  # tensor-parallel ranks per replica
    pp: int = 1  # pipeline stages per replica
    processes: int = 1  # worker processes launched
    ranks_per_process: int = 1  # data-parallel ranks whose batches one process consumes (single, one-process pipes)

    @property
    def data_ranks(self) -> int:
        """Shards of the global batch: the data-parallel size the sampler splits by."""
        return self.dp * self.ranks_per_process

    def data_ranks_of(self, dp_rank: int) -> list[int]:
        """The sampler ranks whose micro-batches a process with this data-parallel rank consumes."""
        n = self.ranks_per_process
        return list(range(dp_rank * n, (dp_rank + 1) * n))

    def as_dict(self) -> dict[str, int]:
        return {"world": self.world, "dp": self.dp, "tp": self.tp, "pp": self.pp, "processes": self.processes}

    @classmethod
    def data_parallel(cls, world: int) -> "Layout":
        return cls(world=world, dp=world, processes=world)

    @classmethod
    def model_parallel(cls, world: int, tp: int = 1, pp: int = 1, tp_key: str = "strategy.tp_size",
                       pp_key: str = "strategy.pp_size") -> "Layout":
        """tp x pp x dp = world, refused in one line naming the key the user typed and values that work."""
        for key, v in ((tp_key, tp), (pp_key, pp)):
            if v < 1:
                raise ConfigError(f"{key}={v}: must be a positive integer")
        if world % (tp * pp):
            if tp > 1 and pp > 1:
                what, key, other = f"{tp_key} x {pp_key} = {tp} x {pp}", tp_key, pp
            else:
                what, key, other = (f"{tp_key}={tp}", tp_key, 1) if tp > 1 else (f"{pp_key}={pp}", pp_key, 1)
            fits = [d for d in range(1, world + 1) if world % (d * other) == 0]
            worlds = ", ".join(str(tp * pp * k) for k in (1, 2))
            raise ConfigError(f"{what} does not divide world_size={world}: use {key}="
                              f"{' or '.join(map(str, fits))}, or world_size={worlds}")
        return cls(world=world, dp=world // (tp * pp), tp=tp, pp=pp, processes=world)


def split_stages(costs: list[int], parts: int) -> list[int]:
    """Layers per pipeline stage: the contiguous split into ``parts`` stages with the smallest largest
    stage. The one balance function: runs and the estimator both call it."""
    n, pre = len(costs), [0, *accumulate(costs)]
    best = {(0, 0): (0, [])}  # (stages, layers) -> (largest stage, layers per stage)
    for k in range(1, parts + 1):
        for j in range(k, n - parts + k + 1):
            best[k, j] = min((max(best[k - 1, i][0], pre[j] - pre[i]), best[k - 1, i][1] + [j - i])
                             for i in range(k - 1, j) if (k - 1, i) in best)
    return best[parts, n][1]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
