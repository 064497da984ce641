"""Unit tests: no processes."""
import math

import torch
from conftest import ROOT
from omegaconf import OmegaConf

from parallelkit.data.datasets import Batches, Synthetic, Text
from parallelkit.models.gpt import GPT, GPTConfig, build_model, lm_loss


def cfg_of(name: str) -> GPTConfig:
    return GPTConfig.from_cfg(OmegaConf.load(ROOT / "parallelkit" / "conf" / "model" / f"{name}.yaml"))


def test_shapes_and_param_count_formula():
    c = cfg_of("tiny")
    m = GPT(c)
    idx = torch.randint(0, c.vocab_size, (3, c.seq_len))
    assert m(idx).shape == (3, c.seq_len, c.vocab_size)
    assert m.num_params() == c.num_params() < 1_000_000
    untied = GPTConfig(**{**c.__dict__, "tie_weights": False})
    assert GPT(untied).num_params() == untied.num_params() == c.num_params() + c.vocab_size * c.d_model


def test_gpt3_shapes_without_allocating():
    # GPT-3 paper table 2.1 sizes (tied embeddings): 125M, 350M, 760M, 1.3B.
    expected = {"gpt_125m": 125e6, "gpt_350m": 355e6, "gpt_760m": 760e6, "gpt_1b": 1.31e9}
    for name, n in expected.items():
        assert abs(cfg_of(name).num_params() - n) / n < 0.03, (name, cfg_of(name).num_params())
    c = cfg_of("gpt_1b")
    assert (c.n_layer, c.d_model, c.n_head) == (24, 2048, 16)


def test_flops_per_token():
    c = cfg_of("small")
    n = c.num_params() - c.seq_len * c.d_model
    assert c.flops_per_token() == 6 * n + 12 * c.n_layer * c.d_model * c.seq_len


def test_layers_are_the_forward():
    m = build_model(OmegaConf.load(ROOT / "parallelkit" / "conf" / "model" / "tiny.yaml"), seed=0)
    idx = torch.randint(0, 512, (2, 16))
    x = idx
    for layer in m.layers():
        x = layer(x)
    assert torch.equal(x, m(idx))
    assert len(m.layers()) == m.config.n_layer + 2


def test_init_depends_only_on_seed():
    mc = OmegaConf.load(ROOT / "parallelkit" / "conf" / "model" / "tiny.yaml")
    a, b, c = build_model(mc, 1), build_model(mc, 1), build_model(mc, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head.out.weight, c.head.out.weight)


def test_synthetic_is_deterministic_and_learnable_structure():
    d = Synthetic(512, 64, seed=3)
    assert torch.equal(d.sample(7), Synthetic(512, 64, seed=3).sample(7))
    assert not torch.equal(d.sample(7), d.sample(8))
    s = d.sample(0)
    # every transition is one of `branching` successors of the previous token
    assert all(int(s[t + 1]) in d.table[int(s[t])] for t in range(64))


def test_sampler_same_global_batch_any_dp_and_disjoint_shards():
    d = Synthetic(512, 16, seed=0)
    for step in range(3):
        one = Batches(d, micro_batch_size=4, grad_accum=2, dp_size=1, dp_rank=0)
        two = [Batches(d, micro_batch_size=2, grad_accum=2, dp_size=2, dp_rank=r) for r in range(2)]
        all_one = sorted(i for m in range(2) for i in one.indices(step, m))
        shards = [set(i for m in range(2) for i in b.indices(step, m)) for b in two]
        assert not shards[0] & shards[1]
        assert sorted(shards[0] | shards[1]) == all_one == list(range(step * 8, step * 8 + 8))


def test_text_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("more text " * 50)
    t = Text(str(tmp_path), seq_len=16, seed=0)
    assert len(t.data) == 600 + 500
    s = t.sample(5)
    assert s.shape == (17,) and s.max() < 256 and torch.equal(s, Text(str(tmp_path), 16, 0).sample(5))


def test_lm_loss_at_init_is_about_ln_vocab():
    m = build_model(OmegaConf.load(ROOT / "parallelkit" / "conf" / "model" / "tiny.yaml"), seed=0)
    idx = torch.randint(0, 512, (4, 64))
    loss = lm_loss(m(idx), torch.randint(0, 512, (4, 64)))
    assert abs(loss.item() - math.log(512)) < 0.2
