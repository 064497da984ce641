"""The parallel layout of a run and its rank map: one frozen object, computed once from the config.

Every consumer (config checks, the loop's data sampler, the backends, the summary, the estimator,
the report) reads the same ``Layout``; a strategy only says its tp and pp degrees and whether one
process drives every device.

The rank map. Ranks are laid out on a mesh of the axes ``AXES`` = (pp, dp, cp, tp), slowest to fastest,
row-major as torch's ``DeviceMesh`` lays them out and in the order Megatron and GPT-NeoX use
(DeepSpeed's ``PipeModelDataParallelTopology`` orders (pipe, data, model): the same; torchtitan's mesh
is (pp, dp_replicate, dp_shard, cp, tp): the same, its two dp axes being ``dp`` split slowest-first):

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

so the ranks of one tensor-parallel group are consecutive (one node's fast links), a sequence's
context-parallel ranks next, a pipeline's stages are the farthest apart, and a data-parallel replica
is one pipeline. ``cp`` (context parallelism: one sequence split over ranks) is 1 except under torch_nd. A backend whose library
wants another order converts through ``coords`` / ``rank_of`` here, in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from parallelkit.config.errors import ConfigError

AXES = ("pp", "dp", "cp", "tp")  # the mesh's axes, slowest to fastest


@dataclass(frozen=True)
class Layout:
    world: int  # devices the model runs on
    dp: int  # data-parallel replicas
    tp: int = 1  # tensor-parallel ranks per replica
    pp: int = 1  # pipeline stages per replica
    cp: int = 1  # context-parallel ranks sharing one sequence (torch_nd)
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

    # ---- the rank map (see the module doc): AXES, tp fastest ----
    @property
    def shape(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}

    def coords(self, rank: int) -> dict[str, int]:
        """{pp, dp, cp, tp} of a device rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is not in a world of {self.world}")
        out = {}
        for a in reversed(AXES):
            rank, out[a] = divmod(rank, getattr(self, a))
        return {a: out[a] for a in AXES}

    def rank_of(self, pp: int = 0, dp: int = 0, cp: int = 0, tp: int = 0) -> int:
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def group(self, axis: str, rank: int) -> list[int]:
        """The ranks that differ from ``rank`` along ``axis`` only (its tensor-, data- or pipeline-parallel group)."""
        c = self.coords(rank)
        return [self.rank_of(**{**c, axis: i}) for i in range(self.shape[axis])]

    def groups(self, axis: str) -> list[list[int]]:
        """Every group along ``axis``, each in rank order (what ``dist.new_group`` is called with, on every rank)."""
        return sorted({tuple(self.group(axis, r)) for r in range(self.world)})

    def mesh_description(self) -> str:
        if self.cp > 1:
            return (f"pp x dp x cp x tp = {self.pp} x {self.dp} x {self.cp} x {self.tp}; rank = ((pp_rank * {self.dp} + "
                    f"dp_rank) * {self.cp} + cp_rank) * {self.tp} + tp_rank")
        return (f"pp x dp x tp = {self.pp} x {self.dp} x {self.tp}; rank = (pp_rank * {self.dp} + dp_rank) * {self.tp} "
                f"+ tp_rank")

    def as_dict(self) -> dict[str, int]:
        out = {"world": self.world, "dp": self.dp, "tp": self.tp, "pp": self.pp, "processes": self.processes}
        return {**out, "cp": self.cp} if self.cp > 1 else out

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
