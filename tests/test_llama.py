"""The Llama-shaped model: Hugging Face's logits from the same weights, and the strategies that do not cut the model
train it with parity to single; those that cut it refuse it in one line."""
import pytest
import torch
from conftest import assert_close_trajectory, compose_plan, train_ranks, train_together
from omegaconf import OmegaConf

from parallelkit.config.errors import ConfigError
from parallelkit.models.gpt import GPTConfig, build_model
from parallelkit.models.llama import hf_names

SHAPE = dict(arch="llama", n_layer=3, d_model=96, n_head=6, n_kv_head=2, d_ff=256, vocab_size=300, seq_len=48,
             tie_weights=False, rope_theta=10000.0, norm_eps=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_llama(tied):
    tf = pytest.importorskip("transformers")
    m = OmegaConf.create({**SHAPE, "tie_weights": tied})
    ours = build_model(m, seed=3).eval()
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head, num_key_value_heads=m.n_kv_head, max_position_embeddings=m.seq_len,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=tied, attention_bias=False,
        mlp_bias=False, attn_implementation="eager")).eval()
    mine = dict(ours.named_parameters())
    theirs = hf.state_dict()
    names = hf_names(m.n_layer, tied)
    assert set(names) == set(mine) and set(names.values()) <= set(theirs)
    with torch.no_grad():
        for a, b in names.items():
            theirs[b].copy_(mine[a])
    assert sum(p.numel() for p in hf.parameters()) == GPTConfig.from_cfg(m).num_params() == ours.num_params()
    idx = torch.randint(0, m.vocab_size, (2, m.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(idx), hf(idx).logits
    assert (a - b).abs().max().item() < 1e-5, (a - b).abs().max().item()


def test_it_trains_like_single_whole_sharded_and_tensor_parallel(tmp_path):
    """ddp, zero3 and fsdp hold it whole or sharded; torch_nd cuts every block over 2 tensor-parallel ranks (its
    Llama plan: q, k, v, gate, up column-wise, o and down row-wise, RMSNorms sequence-parallel)."""
    common = ["model=llama_tiny", "train.steps=8", "train.global_batch_size=8", "train.grad_clip=0.1"]
    ref = train_ranks(tmp_path, "single", "strategy=single", *common)
    runs = train_together(tmp_path, {s: [f"strategy={s}", *common] for s in ("ddp", "zero3", "fsdp", "torch_nd")})
    assert runs["torch_nd"]["label"] == "torch nd tp2+sp"
    for name, s in runs.items():
        assert s["params"] == ref["params"] == GPTConfig.from_cfg(compose_plan("model=llama_tiny").cfg.model).num_params()
        assert_close_trajectory(s["losses"], ref["losses"], rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]


@pytest.mark.parametrize("strategy", ["fairscale_tp", "deepspeed_pipe", "neox_3d", "fairscale_pipe"])
def test_strategies_that_cut_the_model_refuse_it_in_one_line(strategy):
    with pytest.raises(ConfigError) as e:
        compose_plan("model=llama_tiny", f"strategy={strategy}", "world_size=4" if strategy == "neox_3d" else "world_size=2")
    assert "\n" not in str(e.value) and "model.arch=llama runs under" in str(e.value), str(e.value)


def test_bad_llama_shape_is_one_line():
    with pytest.raises(ConfigError, match="model.n_kv_head=4 does not divide model.n_head=6"):
        compose_plan("model=llama_tiny", "model.n_head=6", "model.d_model=96", "model.n_kv_head=4")


def test_torch_pipelining_cuts_it_and_matches_single(tmp_path):
    """Our Llama keeps the GPT's layer list (embedding, blocks, head): torch.distributed.pipelining cuts it the same
    way (pp 2, 1F1B over 2 micro-batches) and the losses follow single's."""
    common = ["model=llama_tiny", "model.n_layer=4", "train.steps=8", "train.global_batch_size=8",
              "train.micro_batch_size=4", "train.grad_clip=0.5"]
    ref = train_ranks(tmp_path, "single", "strategy=single", *common)
    s = train_ranks(tmp_path, "pipe", "strategy=torch_pipe", *common)
    assert s["strategy_facts"]["pp"] == 2 and s["strategy_facts"]["micro_batches"] == 2
    assert_close_trajectory(s["losses"], ref["losses"], rtol=1e-5)
