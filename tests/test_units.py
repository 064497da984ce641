"""Unit tests in one process: communication counting, byte accounting, the schedule, parameter groups,
the layout, and every strategy's options schema."""
import dataclasses
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, compose_run
from omegaconf import OmegaConf, open_dict

from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import Layout, split_stages
from parallelkit.config.plan import RunPlan, options_dict, planned_strategy  # noqa: F401
from parallelkit.measure.metrics import CommCounter
from parallelkit.models.gpt import build_model
from parallelkit.runtime.plan import build_plan  # noqa: F401
from parallelkit.strategies.shared.optim import lr_at, param_groups
from parallelkit.util.tensors import tensor_bytes

TINY = OmegaConf.create({"n_layer": 2, "n_head": 4, "d_model": 64, "vocab_size": 512, "seq_len": 64})


@pytest.fixture(scope="module")
def one_rank_group():
    """A real gloo process group of one rank (collectives run, nothing leaves the process)."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def test_comm_counter_counts_by_kind_only_while_installed(one_rank_group):
    c = CommCounter()
    original = dist.all_reduce
    x = torch.ones(10)  # 40 bytes
    dist.all_reduce(x)
    assert c.bytes == 0  # not installed: nothing counted, the original function runs
    with c.counting():
        assert dist.all_reduce is not original
        dist.all_reduce(x)
        dist.all_reduce(tensor=x)  # the payload as a keyword
        out = torch.empty(10)
        dist.all_gather_into_tensor(out, x)
        dist.broadcast(x, src=0)
        dist.reduce_scatter_tensor(torch.empty(10), x)
    assert dist.all_reduce is original  # uninstalled
    assert c.by_kind() == {"all_reduce": {"calls": 2, "bytes": 80}, "all_gather": {"calls": 1, "bytes": 40},
                           "broadcast": {"calls": 1, "bytes": 40}, "reduce_scatter": {"calls": 1, "bytes": 40}}
    assert c.bytes == 200
    c.add("all_reduce", 8, calls=3)  # what a strategy reports from C++ paths (DDP's buckets)
    assert c.kinds["all_reduce"] == [5, 88]


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(100)
    assert tensor_bytes([a, a[:10], a.view(10, 10), None]) == 400  # views share the storage
    assert tensor_bytes([a, torch.zeros(5, dtype=torch.bfloat16), torch.zeros(0)]) == 410
    m = build_model(TINY, 0)
    assert m.head.out.weight is m.embed.tok.weight
    assert tensor_bytes(m.parameters()) == 4 * sum(p.numel() for p in m.parameters()) == 4 * 136_960


def test_schedule_warms_up_then_decays_to_the_floor():
    o = OmegaConf.create({"lr": 1e-3, "warmup_steps": 4, "min_lr_ratio": 0.1})
    lrs = [lr_at(s, o, 20) for s in range(21)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[20] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay


def test_param_groups_decay_matrices_once():
    m = build_model(TINY, 0)
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in m.named_parameters() if p.dim() == 2 and "pos" not in n}
    assert "embed.pos.weight" in {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))  # the tied weight once
    flat = torch.nn.Parameter(torch.zeros(12))  # a ZeRO-3 placeholder: its full shape says matrix
    groups = param_groups([("w", flat)], 0.1, shape_of=lambda p: (3, 4))
    assert groups[0]["params"] == [flat]


def test_init_weights_reruns_bit_identically():
    a, b = build_model(TINY, 0), build_model(TINY, 0)
    with torch.no_grad():
        for p in b.parameters():
            p.zero_()
    b.init_weights(0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = build_model(TINY, 1)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert torch.equal(a.blocks[0].ln1.weight, torch.ones(64)) and float(a.blocks[1].mlp.fc.bias.abs().sum()) == 0


def test_layout_and_its_errors():
    lay = Layout(world=1, dp=1, processes=1, ranks_per_process=4)
    assert lay.data_ranks == 4 and lay.data_ranks_of(0) == [0, 1, 2, 3]
    assert Layout.model_parallel(8, tp=2, pp=2).dp == 2
    with pytest.raises(ConfigError, match=r"^strategy.tp_size=3 does not divide world_size=2: use strategy.tp_size=1 or 2"):
        Layout.model_parallel(2, tp=3)
    with pytest.raises(ConfigError, match=r"strategy.pp_size=3 does not divide world_size=4"):
        Layout.model_parallel(4, pp=3)
    assert split_stages([1, 1, 1, 1], 2) == [2, 2] and split_stages([5, 1, 1, 1, 1, 1, 5], 3) == [1, 5, 1]


PRESETS = sorted(p.stem for p in (ROOT / "parallelkit" / "conf" / "strategy").glob("*.yaml"))
BAD = {int: "abc", float: "fast", bool: "maybe"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_option_is_typed_and_unknown_ones_are_refused(preset):
    """Each strategy's options come from its schema: defaults filled in, a wrong type or an unknown option
    refused in one line naming the key."""
    # plan: the schema and the layout, not the machine checks; world_size 8 fits every preset's default layout
    cfg = compose_run(f"strategy={preset}", "world_size=8", checked=False)
    cls = planned_strategy(cfg)[0]
    fields = [f for f in dataclasses.fields(cls.Options) if f.name != "name"]
    assert set(options_dict(cls.options(cfg))) == {f.name for f in fields}  # every option, defaults filled in
    for f in fields:
        bad = BAD.get(f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool}.get(str(f.type)))
        if bad is None:
            continue
        c = cfg.copy()
        with open_dict(c.strategy):
            c.strategy[f.name] = bad  # what Hydra hands over for strategy.<name>=<bad> on the command line
        with pytest.raises(ConfigError) as e:
            planned_strategy(c)
        assert str(e.value).startswith(f"strategy.{f.name}='{bad}': must be") and "\n" not in str(e.value)
    c = cfg.copy()
    with open_dict(c.strategy):
        c.strategy.no_such_option = 1
    with pytest.raises(ConfigError, match=r"^strategy.no_such_option: no such option"):
        planned_strategy(c)


def test_compare_all_lists_every_configuration_once():
    """The canned comparison covers every preset, each configuration once (a preset equal to a listed one,
    like deepspeed = zero2, is left out), at one global batch for every layout."""
    from parallelkit.config.sweep import _preset_key, distinct_strategies

    exp = OmegaConf.load(ROOT / "parallelkit" / "conf" / "experiment" / "compare_all.yaml")
    listed = exp.hydra.sweeper.params.strategy.split(",")
    keys = {_preset_key(n) for n in listed}
    assert len(keys) == len(listed)  # no two listed presets are the same job
    assert all(_preset_key(n) in keys for n in PRESETS), "a preset is missing from compare_all"
    assert exp.train.global_batch_size
    expanded = distinct_strategies(["strategy=glob(*)"])[0].split("=")[1].split(",")
    assert len(expanded) == len(listed) and "zero2" not in expanded and "deepspeed" in expanded


RETENTION = r"""
import sys, torch
from parallelkit.measure.metrics import fix_mmap_threshold
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
print(fix_mmap_threshold(None if sys.argv[1] == "null" else int(sys.argv[1])), file=sys.stderr)
big = torch.ones(4 * 2**20)  # 16 MiB, mapped; freeing it raises glibc's dynamic threshold to 16 MiB
del big
before = rss()
blocks = [torch.ones(2**19) for _ in range(100)]  # 100 x 2 MiB
keep = torch.ones(2**10)  # allocated after them: the heap cannot shrink below it
del blocks
print(rss() - before)
"""


@pytest.mark.parametrize("threshold", [1 << 20, None])
def test_mmap_threshold_gives_freed_tensors_back(threshold):
    """train.cpu_mmap_threshold: with it, 200 MiB of freed 2 MiB tensors leave RSS at once. Under glibc's dynamic
    threshold (null), once a 16 MiB tensor has been freed, they may stay: 8 MiB or 200 MiB of them stayed in
    identical runs here, what made CPU peaks differ by 100+ MiB between identical runs (experiments/mem_phases.py);
    only the summary's account of it is asserted there."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")

    p = subprocess.run([sys.executable, "-c", RETENTION, str(threshold if threshold else "null")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    kept = float(p.stdout.split()[-1])
    if threshold:
        assert "mmap threshold 1048576 B" in p.stderr and kept < 20, (kept, p.stderr)
    else:
        assert p.stderr.strip() == "glibc default (dynamic mmap threshold)" and kept >= 0


@pytest.mark.parametrize("value, says", [(-1, "must be an integer >= 0"), (2**26, "at most 33554432"),
                                         ("big", "must be an integer")])
def test_bad_mmap_threshold_is_one_line(value, says):
    cfg = compose_run("strategy=ddp", "model=tiny", checked=False)
    with open_dict(cfg):
        cfg.train.cpu_mmap_threshold = value
    with pytest.raises(ConfigError, match=says):
        build_plan(cfg)


def test_a_checkpoint_save_is_measured_apart_from_the_training_peak():
    """The high-water mark is folded in before a save and reset after it: a save that allocates 256 MiB more than
    the steps around it raises the save's peak, not the training peak."""
    from parallelkit.measure.metrics import PeakWindow

    cpu = torch.device("cpu")
    w = PeakWindow(cpu)
    w.start()
    step = torch.ones(2**22)  # 16 MiB of "training"
    w.before_save()
    gathered = torch.ones(2**26)  # 256 MiB, as a rank-0 gather of the full state
    del gathered
    w.after_save()
    step += 1
    train, save = w.finish()
    assert save["rss"] - train["rss"] > 200 * 2**20, (train, save)


def test_the_live_heap_peak_is_sampled_without_changing_the_allocator():
    """LivePeak sees a 128 MiB tensor that lived and died inside it, though RSS-based counters would keep it."""
    from parallelkit.measure.metrics import LivePeak, heap_in_use

    before = heap_in_use()
    if before is None:
        pytest.skip("not glibc >= 2.33: no mallinfo2")
    with LivePeak() as live:
        x = torch.ones(2**25)  # 128 MiB
        import time

        time.sleep(0.05)
        del x
    assert live.peak - before >= 120 * 2**20 and heap_in_use() - before < 64 * 2**20
