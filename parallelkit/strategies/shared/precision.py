"""Training precision in one place: autocast, the fp16 loss scaler, unscaling before clipping.

fp32 does nothing; bf16 autocasts the forward; fp16 (CUDA only) autocasts and scales the
loss. A strategy whose backend casts the model itself (DeepSpeed, FSDP's MixedPrecisionPolicy)
turns autocast off (``Strategy.autocast_forward``); a strategy whose gradients are sharded
passes a scaler class that all-reduces ``found_inf`` (torch's or FairScale's ShardedGradScaler).
"""
from __future__ import annotations

import contextlib

import torch

from parallelkit.util.dtypes import DTYPES


class Precision:
    def __init__(self, name: str, device: torch.device, scaler_class=None):
        self.name, self.device = name, device
        self.dtype = None if name == "fp32" else DTYPES[name]
        self.scaler = None
        if name == "fp16":
            self.scaler = (scaler_class or (lambda: torch.amp.GradScaler(device.type)))()

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer) -> None:
        """Before clipping: the norm must be taken of the true gradients."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
