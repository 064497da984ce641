"""Tokenized corpora on disk, read as one flat stream of token ids (documents end to end, as nanoGPT trains).

* ``data=nanogpt``: nanoGPT's ``train.bin``: the ids as raw ``uint16`` (``data.dtype=uint32`` for a
  vocabulary over 65,536), no header.
* ``data=megatron``: a GPT-NeoX / Megatron indexed dataset, ``PREFIX.bin`` (the ids) and ``PREFIX.idx``
  (magic ``MMIDIDX``, version 1, the dtype's code, the sequence and document counts, then each sequence's
  length and byte offset and the document boundaries), read here without Megatron.

Each file is checked before any worker starts (``check``); a bad one is one line naming ``data.path``.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

NANOGPT_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                   8: np.uint16}  # megatron.core.datasets.indexed_dataset.DType
MAGIC = b"MMIDIDX\x00\x00"
HEADER = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version <Q, dtype code <B, sequence count <Q, document count <Q
SCAN = 1 << 28  # tokens checked against the vocabulary before launch (the first 256M; all of a smaller file)
FORMATS = ("nanogpt", "megatron")


class TokenFileError(ValueError):
    """A token file that cannot be trained on: one line naming the file and the fix."""


def megatron_paths(path: str | Path) -> tuple[Path, Path]:
    """``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx`` -> (``PREFIX.bin``, ``PREFIX.idx``)."""
    p = Path(path).expanduser()
    prefix = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


def read_index(idx: Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, sequence byte offsets) of a Megatron ``.idx``."""
    raw = idx.read_bytes()
    if raw[: len(MAGIC)] != MAGIC:
        raise TokenFileError(f"{idx} is not a Megatron index (no MMIDIDX header): give the prefix of a .bin/.idx pair "
                             f"written by Megatron's or GPT-NeoX's preprocess_data.py")
    if len(raw) < HEADER:
        raise TokenFileError(f"{idx} is truncated ({len(raw)} bytes, shorter than its header): write it again")
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, len(MAGIC))
    if version != 1:
        raise TokenFileError(f"{idx}: index version {version}; this reader knows version 1")
    if code not in MEGATRON_DTYPES:
        raise TokenFileError(f"{idx}: unknown token dtype code {code} (known: {sorted(MEGATRON_DTYPES)})")
    need = HEADER + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if len(raw) < need:
        raise TokenFileError(f"{idx} is truncated: its header counts {n_seq} sequences and {n_doc} document "
                             f"boundaries ({need} bytes), the file has {len(raw)}: write it again")
    lengths = np.frombuffer(raw, np.int32, n_seq, HEADER)
    offsets = np.frombuffer(raw, np.int64, n_seq, HEADER + 4 * n_seq)
    return np.dtype(MEGATRON_DTYPES[code]), lengths, offsets


def open_tokens(name: str, path: str, dtype: str | None = None) -> np.ndarray:
    """The corpus as one read-only memory-mapped array of token ids; TokenFileError when it is not one."""
    if name == "megatron":
        bin_path, idx = megatron_paths(path)
        for f in (bin_path, idx):
            if not f.is_file():
                raise TokenFileError(f"{f} does not exist: data=megatron needs PREFIX.bin and PREFIX.idx "
                                     f"(data.path=PREFIX)")
        dt, lengths, offsets = read_index(idx)
        size, counted = bin_path.stat().st_size, int(lengths.astype(np.int64).sum()) * dt.itemsize
        if size != counted or (len(offsets) and int(offsets[-1]) + int(lengths[-1]) * dt.itemsize != size):
            raise TokenFileError(f"{bin_path} holds {size} bytes, its index counts {counted}: one of the pair is "
                                 f"truncated or they are from different datasets")
    else:
        bin_path = Path(path).expanduser()
        if not bin_path.is_file():
            raise TokenFileError(f"{path} does not exist: give nanoGPT's train.bin (data=nanogpt data.path=...)")
        if dtype not in NANOGPT_DTYPES:
            raise TokenFileError(f"data.dtype={dtype!r}: choose uint16 (nanoGPT's GPT-2 files) or uint32")
        dt = np.dtype(NANOGPT_DTYPES[dtype])
        if bin_path.stat().st_size % dt.itemsize:
            raise TokenFileError(f"{bin_path} holds {bin_path.stat().st_size} bytes, not a whole number of {dtype} "
                                 f"tokens: another data.dtype, or a truncated file")
    if bin_path.stat().st_size == 0:
        return np.zeros(0, dt)
    return np.memmap(bin_path, dtype=dt, mode="r")


def check(name: str, path: str, dtype: str | None, vocab_size: int, seq_len: int) -> None:
    """What a run needs of the file: it opens, holds one sequence, and no id (of the first SCAN) is negative or past
    the model's vocabulary. TokenFileError (one line) otherwise."""
    tokens = open_tokens(name, path, dtype)
    if len(tokens) < seq_len + 2:
        raise TokenFileError(f"{path} holds {len(tokens)} tokens; one sequence needs model.seq_len + 2 = {seq_len + 2}")
    for start in range(0, min(len(tokens), SCAN), 1 << 24):
        chunk = tokens[start : start + (1 << 24)]
        lo, hi = chunk.min(), chunk.max()
        if lo < 0 or hi >= vocab_size:
            bad = int(np.argmax((chunk < 0) | (chunk >= vocab_size)))
            raise TokenFileError(f"{path}: token {chunk[bad]} at position {start + bad} is outside model.vocab_size="
                                 f"{vocab_size}: a model with the tokenizer's vocabulary, or the right data.dtype")


class Tokens:
    """Sample ``i``: ``seq_len + 1`` consecutive ids from a start drawn from ``(seed, i)``, as ``Text`` does."""

    def __init__(self, name: str, path: str, dtype: str | None, seq_len: int, seed: int):
        self.data, self.seq_len, self.seed = open_tokens(name, path, dtype), seq_len, seed

    def sample(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, i])
        start = int(rng.integers(0, len(self.data) - self.seq_len - 1))
        return torch.from_numpy(self.data[start : start + self.seq_len + 1].astype(np.int64))
