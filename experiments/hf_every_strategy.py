"""A 20M-parameter Llama from transformers (built from a config: nothing downloaded) under every strategy that does
not cut the model and is not already in tests/test_hf_models.py (which runs ddp, zero3, fsdp and torch_pipe), each
held to single's losses step by step in fp32, on 2 gloo CPU processes in one group. Kept out of the test suite for
CI time; prints one line per strategy: its status and largest relative loss deviation from single.

    python experiments/hf_every_strategy.py
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

STRATEGIES = ("zero0", "zero1", "zero2_offload", "zero3_offload", "fairscale_oss", "fairscale_oss_ddp", "fsdp_zero2",
              "fsdp_zero3_offload")

if __name__ == "__main__":
    import transformers as tf
    from conftest import train_ranks, train_together
    from test_hf_models import LLAMA_20M, folder

    tmp = Path(tempfile.mkdtemp(prefix="hf-every-strategy-"))
    path = folder(tmp, "llama", tf.LlamaConfig(**LLAMA_20M))
    common = ["model=hf", f"model.path={path}", "model.seq_len=64", "train.steps=6", "train.global_batch_size=4",
              "train.micro_batch_size=1", "train.grad_clip=0.1"]
    ref = train_ranks(tmp, "single", "strategy=single", *common)["losses"]
    runs = train_together(tmp, {s: [f"strategy={s}", *common] for s in STRATEGIES})
    for name, s in runs.items():
        dev = max(abs(a - b) / abs(b) for a, b in zip(s["losses"], ref))
        print(f"{name}: {s['status']}, largest relative deviation from single {dev:.1e}", flush=True)
