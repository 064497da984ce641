"""Tensor accounting and call timing that backends and measurements share: the bytes of the distinct storages
behind tensors (views and shared weights once), storages as plain numbers (nothing kept alive), and the time
spent inside chosen methods."""
from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import torch


class Storage(NamedTuple):
    """A storage that was alive at a moment, without keeping it alive: what accounting needs of a tensor."""

    device: torch.device
    ptr: int
    nbytes: int


def storages(tensors) -> list[Storage]:
    """The distinct storages behind ``tensors`` as plain numbers (the tensors themselves are not kept)."""
    out = {}
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)
        if t.numel():
            s = t.untyped_storage()
            out[(str(t.device), s.data_ptr())] = Storage(t.device, s.data_ptr(), s.nbytes())
    return list(out.values())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once); ``Storage``
    records count as the storage they name."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, Storage):
            seen[(str(t.device), t.ptr)] = t.nbytes
            continue
        t = getattr(t, "_local_tensor", t)  # DTensor: this rank's shard
        if t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def time_in(calls: list[tuple[object, str]]):
    """Seconds spent inside the methods ``(object, name)`` while the block runs (a pipeline stage's compute, on
    the probe step): each is wrapped on its instance, and the class's method is back afterwards."""
    spent = [0.0]

    def timed(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        return run

    for obj, name in calls:
        setattr(obj, name, timed(getattr(obj, name)))
    try:
        yield spent
    finally:
        for obj, name in calls:
            delattr(obj, name)


def assign_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` into ``p``, or into this rank's slice of it when ``p`` is a DTensor (FSDP2)."""
    if hasattr(p, "device_mesh") and hasattr(p, "placements"):
        from torch.distributed.tensor._utils import (
            compute_local_shape_and_global_offset,
        )

        shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
        local = p.to_local()
        if local.numel():
            local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
        return
    p.copy_(full)
