"""Hugging Face causal LMs from a local folder (never downloaded): model=hf model.path=<folder>."""
import pytest
import torch
from conftest import assert_close_trajectory, compose_plan, train_ranks, train_together

from parallelkit.config.errors import ConfigError
from parallelkit.models.gpt import GPTConfig, build_model

tf = pytest.importorskip("transformers")

LLAMA_20M = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)


def folder(tmp, name: str, config, weights: bool = False):
    path = tmp / name
    if weights:
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)  # config.json + model.safetensors
    else:
        config.save_pretrained(path)  # config.json only: the run initialises from (seed, name)
    return path


def test_llama_of_20m_from_a_config_trains_under_ddp_zero3_fsdp_and_a_pipeline_like_single(tmp_path):
    """torch_pipe cuts it by its layout (models/hf.py CausalLMParts: embedding, decoder layers, norm and head)."""
    path = folder(tmp_path, "llama", tf.LlamaConfig(**LLAMA_20M))
    common = ["model=hf", f"model.path={path}", "model.seq_len=64", "train.steps=6", "train.global_batch_size=4",
              "train.micro_batch_size=1", "train.grad_clip=0.1"]
    ref = train_ranks(tmp_path, "single", "strategy=single", *common)
    assert 20e6 < ref["params"] < 25e6 and ref["model"] == "hf"
    runs = train_together(tmp_path, {s: [f"strategy={s}", *common] for s in ("ddp", "zero3", "fsdp", "torch_pipe")})
    assert runs["torch_pipe"]["strategy_facts"]["balance"] == [5, 5]  # embedding + 4 layers | 4 layers + norm, head
    for name, s in runs.items():
        assert s["params"] == ref["params"], name
        assert_close_trajectory(s["losses"], ref["losses"], rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_a_checkpoint_folder_gives_the_models_own_logits(tmp_path, family):
    config = {"llama": lambda: tf.LlamaConfig(**{**LLAMA_20M, "vocab_size": 300, "num_hidden_layers": 2}),
              "gpt2": lambda: tf.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64),
              "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=128,
                                                   max_position_embeddings=64)}[family]()
    path = folder(tmp_path, family, config, weights=True)
    plan = compose_plan("model=hf", f"model.path={path}", "model.seq_len=32")
    ours = build_model(plan.cfg.model, seed=0).eval()  # loads model.safetensors
    theirs = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(idx), theirs(idx).logits, atol=1e-5, rtol=0)
        x = idx  # the layer list a pipeline cuts (CausalLMParts): embedding, each decoder layer, norm and head
        for layer in ours.layers():
            x = layer(x)
        assert len(ours.layers()) == 4 and torch.allclose(x, theirs(idx).logits, atol=1e-5, rtol=0)
    shape = GPTConfig.from_cfg(plan.cfg.model)
    assert shape.num_params() == sum(p.numel() for p in theirs.parameters()) == ours.num_params()
    assert shape.n_layer == 2 and len(ours.blocks) == 2


def test_bad_hf_folders_and_strategies_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="model.path='/no/such': give a local folder holding a Hugging Face config.json"):
        compose_plan("model=hf", "model.path=/no/such")
    path = folder(tmp_path, "llama", tf.LlamaConfig(**{**LLAMA_20M, "num_hidden_layers": 2}))
    with pytest.raises(ConfigError, match="strategy=deepspeed_pipe cuts the model .* model.arch=hf runs under .*torch_pipe"):
        compose_plan("model=hf", f"model.path={path}", "model.seq_len=64", "strategy=deepspeed_pipe",
                     "train.global_batch_size=8")
    tied = folder(tmp_path, "tied", tf.LlamaConfig(**{**LLAMA_20M, "num_hidden_layers": 2, "tie_word_embeddings": True}))
    with pytest.raises(ConfigError, match="strategy=torch_pipe cuts a Hugging Face model with tied embeddings"):
        compose_plan("model=hf", f"model.path={tied}", "model.seq_len=64", "strategy=torch_pipe",
                     "train.global_batch_size=8")
