"""One data pipeline for every strategy.

Sample ``i`` of the run is a pure function of ``(seed, i)``. Step ``s`` uses the global
samples ``[s*G, (s+1)*G)`` with ``G = micro_batch_size * grad_accum * dp``; data-parallel
rank ``r`` takes micro-batch ``m`` from the slice starting at ``(m*dp + r) * micro``. So every
strategy sees the same global samples in the same order whatever its data-parallel size,
and resuming at step ``s`` needs no sampler state.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from parallelkit.data.corpus import dtype_of, prepare
from parallelkit.data.tokens import FORMATS, Tokens


class Synthetic:
    """Token streams from a fixed sparse Markov chain: each token has ``branching`` possible
    successors, so the best achievable loss is about ln(branching), far below ln(vocab)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, branching: int = 4):
        rng = np.random.default_rng([seed, 0])
        self.table = rng.integers(0, vocab_size, (vocab_size, branching)).tolist()
        self.vocab, self.seq_len, self.seed, self.branching = vocab_size, seq_len, seed, branching

    def sample(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, 1, i])
        choice = rng.integers(0, self.branching, self.seq_len).tolist()
        tok = [int(rng.integers(0, self.vocab))]
        for c in choice:  # plain ints: about 0.1 us a token
            tok.append(self.table[tok[-1]][c])
        return torch.tensor(tok, dtype=torch.long)


class Text:
    """Byte-level tokens (ids 0..255) from a local file, or every file under a folder."""

    def __init__(self, path: str, seq_len: int, seed: int):
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        self.data = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
        if len(self.data) < seq_len + 2:
            raise ValueError(f"data.path={path} holds {len(self.data)} bytes; need more than seq_len+1={seq_len + 1}")
        self.seq_len, self.seed = seq_len, seed

    def sample(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, i])
        start = int(rng.integers(0, len(self.data) - self.seq_len - 1))
        return torch.from_numpy(self.data[start : start + self.seq_len + 1].astype(np.int64))


def make_dataset(data_cfg, model_cfg, seed: int):
    if data_cfg.name == "text":
        return Text(data_cfg.path, model_cfg.seq_len, seed)
    if data_cfg.name in FORMATS:  # nanoGPT's and Megatron's token files
        return Tokens(data_cfg.name, data_cfg.path, data_cfg.get("dtype"), model_cfg.seq_len, seed)
    if data_cfg.name == "corpus":  # text through a real tokenizer, tokenized once into a cached token file
        path = prepare(data_cfg)
        return Tokens("nanogpt", str(path), dtype_of(path), model_cfg.seq_len, seed)
    return Synthetic(model_cfg.vocab_size, model_cfg.seq_len, seed, data_cfg.get("branching", 4))


def prepare_data(data_cfg) -> None:
    """What a dataset needs done once before the workers start (tokenizing a corpus); nothing for the others."""
    if data_cfg.name == "corpus":
        prepare(data_cfg)


class Batches:
    """The micro-batches of one data-parallel rank, step by step."""

    def __init__(self, dataset, micro_batch_size: int, grad_accum: int, dp_size: int, dp_rank: int):
        self.ds, self.mb, self.accum, self.dp, self.rank = dataset, micro_batch_size, grad_accum, dp_size, dp_rank

    @property
    def global_batch(self) -> int:
        return self.mb * self.accum * self.dp

    def indices(self, step: int, micro: int) -> range:
        start = step * self.global_batch + (micro * self.dp + self.rank) * self.mb
        return range(start, start + self.mb)

    def micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        toks = torch.stack([self.ds.sample(i) for i in self.indices(step, micro)])
        return toks[:, :-1], toks[:, 1:]  # inputs, next-token targets: (B, T) each

    def step(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.micro_batch(step, m) for m in range(self.accum)]
