"""A Hugging Face causal LM (``transformers``) built from a local folder, never downloaded: ``model=hf
model.path=<folder>``, the folder holding ``config.json`` and, optionally, ``model.safetensors`` (then the run
starts from those weights). Any ``AutoModelForCausalLM`` architecture (Llama, Mistral, Qwen, GPT-NeoX, GPT-2...)
runs under the strategies that do not cut the model; ``models/llama.py`` is our own Llama for the rest.

It keeps the GPT's contract: ``blocks`` (the decoder layers, which FSDP shards one by one),
``init_weights(seed, assign)`` (each parameter from ``(seed, name)``, or from the checkpoint: every strategy
starts from the same values however it shards), ``tie()``, ``forward(idx) -> logits``. The planner fills
``model.n_layer``, ``d_model``, ``n_head``, ``vocab_size`` and ``tie_weights`` from ``config.json``
(``hf_fields``) so the data, the checks and the estimator read them as for the GPT.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from parallelkit.models.common import unique_parameters
from parallelkit.util.tensors import assign_full

WEIGHTS = "model.safetensors"


def _config_json(path: str | Path) -> dict:
    f = Path(path).expanduser() / "config.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path={path}: no readable config.json ({type(e).__name__}: {e}): give a folder "
                         f"holding a Hugging Face config.json (and optionally {WEIGHTS})") from None


def hf_fields(path: str | Path) -> dict:
    """The model.* values the rest of the run reads, from the folder's config.json."""
    c = _config_json(path)
    get = lambda *keys: next((c[k] for k in keys if c.get(k) is not None), None)  # noqa: E731
    out = {"n_layer": get("num_hidden_layers", "n_layer"), "d_model": get("hidden_size", "n_embd"),
           "n_head": get("num_attention_heads", "n_head"), "vocab_size": get("vocab_size"),
           "tie_weights": bool(c.get("tie_word_embeddings", True))}
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise ValueError(f"model.path={path}: config.json has no {', '.join(missing)} (a causal LM's config?)")
    return out


def _hf_config(path: str | Path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(Path(path).expanduser()), local_files_only=True)
    cfg.use_cache = False
    return cfg


@dataclass
class HFShape:
    """The shape questions the estimator and the predictors ask, answered from a model built on the meta device."""

    path: str
    seq_len: int
    n_layer: int = 0
    n_head: int = 0
    d_model: int = 0
    vocab_size: int = 0
    tie_weights: bool = True
    arch: str = "hf"
    counts: dict = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, m) -> "HFShape":
        return cls(path=str(m.path), seq_len=int(m.seq_len), **hf_fields(m.path))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @cached_property
    def _counts(self) -> dict:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_hf_config(self.path))
        blocks = decoder_layers(model)
        total = sum(p.numel() for p in model.parameters())
        block = sum(p.numel() for p in blocks[0].parameters())
        embed = sum(p.numel() for p in model.get_input_embeddings().parameters())
        return {"total": total, "block": block, "embed": embed, "head": total - embed - block * len(blocks)}

    def block_params(self) -> int:
        return self._counts["block"]

    def block_matmul_params(self) -> int:
        return self.block_params()

    def embed_params(self) -> int:
        return self._counts["embed"]

    def head_params(self, own_copy: bool = False) -> int:
        return self._counts["head"] + (self.vocab_size * self.d_model if own_copy and self.tie_weights else 0)

    def layer_params(self, own_head: bool = True) -> list[int]:
        return [self.embed_params(), *[self.block_params()] * self.n_layer, self.head_params(own_head)]

    def num_params(self) -> int:
        return self._counts["total"]

    def flops_per_token(self) -> float:
        n = self.num_params() - (0 if self.tie_weights else self.embed_params())
        return 6 * n + 12 * self.n_layer * self.d_model * self.seq_len


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the first ModuleList as long as the config's layer count (model.layers, gpt_neox.layers,
    transformer.h, ...)."""
    n = model.config.num_hidden_layers
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"no list of {n} decoder layers found in {type(model).__name__}")


class CausalLMParts:
    """The small description of a causal LM that pipelines cut by: where its embedding, decoder layers, final norm
    and head are, and how a decoder layer is called on hidden states alone. Three layouts cover the families
    transformers ships most: Llama and its relatives (Mistral, Qwen2: ``model.embed_tokens``, ``model.layers``,
    ``model.norm``, ``lm_head``, rotary ``model.rotary_emb``), GPT-NeoX (``gpt_neox.embed_in``, ``layers``,
    ``final_layer_norm``, ``lm_head``) and GPT-2 (``transformer.wte`` + ``wpe``, ``h``, ``ln_f``, ``lm_head``).
    ``None`` for a model of another layout: it runs only under the strategies that do not cut it."""

    def __init__(self, hf: nn.Module):
        self.hf = hf
        if hasattr(getattr(hf, "model", None), "embed_tokens"):
            self.base, self.embed_names, self.norm_name, self.head_name = "model", ["embed_tokens"], "norm", "lm_head"
        elif hasattr(hf, "gpt_neox"):
            head = "embed_out" if hasattr(hf, "embed_out") else "lm_head"  # transformers 5 calls it lm_head
            self.base, self.embed_names, self.norm_name, self.head_name = "gpt_neox", ["embed_in"], "final_layer_norm", head
        elif hasattr(getattr(hf, "transformer", None), "wte"):
            self.base, self.embed_names, self.norm_name, self.head_name = "transformer", ["wte", "wpe"], "ln_f", "lm_head"
        else:
            raise ValueError(f"{type(hf).__name__}: not a layout pipelines know (Llama, GPT-NeoX or GPT-2)")

    @classmethod
    def of(cls, hf: nn.Module) -> "CausalLMParts | None":
        try:
            return cls(hf)
        except ValueError:
            return None

    @property
    def body(self) -> nn.Module:
        return getattr(self.hf, self.base)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        body = self.body
        x = getattr(body, self.embed_names[0])(idx)
        if len(self.embed_names) > 1:  # learned positions (GPT-2)
            x = x + getattr(body, self.embed_names[1])(torch.arange(idx.size(1), device=idx.device))
        return x

    def block(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kw = {}
        rotary = getattr(self.body, "rotary_emb", None)
        if rotary is not None:
            pos = torch.arange(x.size(1), device=x.device).unsqueeze(0)
            kw = {"position_ids": pos, "position_embeddings": rotary(x, pos)}
        out = layer(x, attention_mask=None, **kw)  # no mask: SDPA's causal attention over the whole sequence
        return out[0] if isinstance(out, tuple) else out

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.hf, self.head_name)(getattr(self.body, self.norm_name)(x))

    def drop(self, first: bool, last: bool) -> None:
        """Replace the embedding (``first``) and the final norm and head (``last``) by identities."""
        if first:
            for n in self.embed_names:
                setattr(self.body, n, nn.Identity())
        if last:
            setattr(self.body, self.norm_name, nn.Identity())
            setattr(self.hf, self.head_name, nn.Identity())


class _Piece(nn.Module):
    """One entry of ``HFCausalLM.layers()``: the modules it runs registered (so a pipeline stage holds their
    parameters), the description that says how to run them kept outside the module tree."""

    def __init__(self, parts: CausalLMParts, kind: str, modules: list[nn.Module]):
        super().__init__()
        self.kind, self.held = kind, nn.ModuleList(modules)
        object.__setattr__(self, "parts", parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embed":
            return self.parts.embed(x)
        if self.kind == "head":
            return self.parts.head(x)
        return self.parts.block(self.held[0], x)


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the GPT's contract. Built on the CPU whatever device context it is built
    in (its buffers, e.g. RoPE's inverse frequencies, are computed in its constructor), so ``to_empty`` keeps
    the buffers and only the parameters are left for ``init_weights``."""

    def __init__(self, c: HFShape):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.config, self.path = c, Path(c.path).expanduser()
        with torch.device("cpu"):
            self.hf = AutoModelForCausalLM.from_config(_hf_config(c.path), attn_implementation="sdpa")
        self.blocks = decoder_layers(self.hf)

    def to_empty(self, *, device, recurse: bool = True):
        saved = {n: b.detach().to("cpu", copy=True) for n, b in self.named_buffers() if b.device.type != "meta"}
        super().to_empty(device=device, recurse=recurse)
        with torch.no_grad():
            for n, b in self.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
        return self

    def tie(self) -> None:
        if self.config.tie_weights:
            self.hf.tie_weights()

    @torch.no_grad()
    def init_weights(self, seed: int, assign=None) -> None:
        """From the folder's model.safetensors when there is one (names as transformers saves them), else
        N(0, 0.02) matrices and embeddings (residual output projections scaled by 1/sqrt(2 n_layer)), zero
        biases, unit norm gains; each drawn from (seed, name)."""
        assign = assign or assign_full
        weights = None
        if (self.path / WEIGHTS).is_file():  # loaded by transformers itself: it knows each family's renamed keys
            from transformers import AutoModelForCausalLM

            with torch.device("cpu"):
                saved = AutoModelForCausalLM.from_pretrained(str(self.path), local_files_only=True)
            weights = {n: t.detach() for n, t in saved.named_parameters(remove_duplicate=False)}
        for m, name, p, shape in unique_parameters(self):
            key = name.removeprefix("hf.")
            if weights is not None:
                if key not in weights:
                    raise ValueError(f"{self.path / WEIGHTS} holds no {key}: not the weights of this config.json")
                assign(p, weights[key].float())
            elif name.rsplit(".", 1)[-1] == "bias":
                assign(p, torch.zeros(shape))
            elif "norm" in type(m).__name__.lower():
                assign(p, torch.ones(shape))
            else:
                g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                scaled = key.endswith(("o_proj.weight", "down_proj.weight", "dense_4h_to_h.weight", "c_proj.weight"))
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if scaled else 0.02
                assign(p, torch.empty(shape).normal_(0.0, std, generator=g))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits

    # ---- the layer list pipelines cut (CausalLMParts: Llama, GPT-NeoX and GPT-2 layouts) ----
    def layers(self) -> list[nn.Module]:
        parts = CausalLMParts(self.hf)
        body = parts.body
        embed = [getattr(body, n) for n in parts.embed_names]
        head = [getattr(body, parts.norm_name), getattr(self.hf, parts.head_name)]
        return [_Piece(parts, "embed", embed), *[_Piece(parts, "block", [b]) for b in self.blocks],
                _Piece(parts, "head", head)]

    def keep_layers(self, mine: set[int]) -> None:
        """Drop (replace by identities) every entry of ``layers()`` whose index is not in ``mine``; names stay."""
        for i in range(len(self.blocks)):
            if i + 1 not in mine:
                self.blocks[i] = nn.Identity()
        CausalLMParts(self.hf).drop(first=0 not in mine, last=len(self.blocks) + 1 not in mine)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
