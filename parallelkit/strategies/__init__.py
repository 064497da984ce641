"""The backends, one file each, by family (torch/, deepspeed/, fairscale/), and what they share (shared/)."""

# Where each backend class lived before the package was arranged by family: configs saved by older runs (run
# folders, native checkpoints) name these; ``config.plan.strategy_class`` reads them through this table.
MOVED = {
    "parallelkit.strategies.single.": "parallelkit.strategies.torch.single.",
    "parallelkit.strategies.ddp.": "parallelkit.strategies.torch.ddp.",
    "parallelkit.strategies.fsdp.": "parallelkit.strategies.torch.fsdp.",
    "parallelkit.strategies.fsdp1.": "parallelkit.strategies.torch.fsdp1.",
    "parallelkit.strategies.torch_pipe.": "parallelkit.strategies.torch.pipe.",
    "parallelkit.strategies.deepspeed.DeepSpeedStrategy": "parallelkit.strategies.deepspeed.zero.DeepSpeedStrategy",
    "parallelkit.strategies.deepspeed_pipe.": "parallelkit.strategies.deepspeed.pipe.",
    "parallelkit.strategies.neox_3d.": "parallelkit.strategies.deepspeed.neox_3d.",
    "parallelkit.strategies.fairscale_oss.": "parallelkit.strategies.fairscale.oss.",
    "parallelkit.strategies.fairscale_pipe.": "parallelkit.strategies.fairscale.pipe.",
    "parallelkit.strategies.fairscale_tp.": "parallelkit.strategies.fairscale.tp.",
    "parallelkit.strategies.fairscale_fsdp.": "parallelkit.strategies.fairscale.fsdp.",
}
