"""Text through a real tokenizer: ``data=corpus``.

The corpus (``data.path``: a text file, a folder of them, or ``stdlib``: the running Python's standard library
sources, present on every machine with Python) is tokenized once, with a byte-level BPE tokenizer of
``data.tokenizer_vocab`` tokens trained on the corpus itself (Hugging Face ``tokenizers``), or with a given
``tokenizer.json`` (``data.tokenizer``); the ids go into a token file (nanoGPT's format) in the cache folder,
keyed by everything they depend on, and the workers read that file as ``data=nanogpt`` does. The launcher
prepares it before any worker starts; a worker that finds it missing (a torchrun job) prepares it too (the
file appears by an atomic rename, so concurrent preparations cannot mix).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from parallelkit.util.cache import cache_dir

STDLIB = "stdlib"


def corpus_files(path: str) -> list[Path]:
    """The corpus's files, in a fixed order: ``stdlib`` is the standard library's .py files (not its tests)."""
    if path == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in root.rglob("*.py") if not {"site-packages", "test", "tests", "idlelib"} & set(p.parts))
    p = Path(path).expanduser()
    return sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]


def tokenizer_vocab(data_cfg) -> int:
    """The tokenizer's vocabulary size (the model's vocab_size must cover it)."""
    if data_cfg.get("tokenizer"):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(Path(data_cfg.tokenizer).expanduser())).get_vocab_size()
    return int(data_cfg.tokenizer_vocab)


def token_file(data_cfg) -> Path:
    """Where the corpus's ids are kept: named by what they depend on (the files' names, sizes and times, the
    tokenizer), so a changed corpus or tokenizer is tokenized again."""
    files = corpus_files(str(data_cfg.path))
    key = hashlib.sha1()
    for f in files:
        st = f.stat()
        key.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    tok = data_cfg.get("tokenizer")
    key.update((f"tokenizer={Path(tok).expanduser().resolve()}:{Path(tok).stat().st_mtime_ns}" if tok
                else f"bpe={int(data_cfg.tokenizer_vocab)}").encode())
    name = "stdlib" if str(data_cfg.path) == STDLIB else Path(str(data_cfg.path)).name
    return cache_dir() / "corpus" / f"{name}-{key.hexdigest()[:16]}" / "tokens.bin"


def prepare(data_cfg, quiet: bool = False) -> Path:
    """The token file of ``data_cfg``, tokenizing the corpus first if it is not in the cache (seconds)."""
    out = token_file(data_cfg)
    if out.is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = corpus_files(str(data_cfg.path))
    if not quiet:
        print(f"parallelkit: tokenizing {len(files)} file(s) of {data_cfg.path} once (cached in {out.parent})",
              file=sys.stderr, flush=True)
    if data_cfg.get("tokenizer"):
        tok = Tokenizer.from_file(str(Path(data_cfg.tokenizer).expanduser()))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train([str(f) for f in files], trainers.BpeTrainer(
            vocab_size=int(data_cfg.tokenizer_vocab), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
    ids = [np.asarray(e.ids, np.uint32) for e in tok.encode_batch([f.read_text(errors="replace") for f in files])]
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tokens.{os.getpid()}.tmp")
    np.concatenate(ids).astype(dtype).tofile(tmp)
    tok.save(str(out.with_name(f".tokenizer.{os.getpid()}.tmp")))
    os.replace(out.with_name(f".tokenizer.{os.getpid()}.tmp"), out.with_name("tokenizer.json"))
    (out.with_name("meta.json")).write_text(json.dumps({"path": str(data_cfg.path), "files": len(files),
                                                        "vocab": tok.get_vocab_size(), "dtype": np.dtype(dtype).name}))
    os.replace(tmp, out)  # last: its presence says the rest is there
    return out


def dtype_of(bin_path: Path) -> str:
    return json.loads((bin_path.with_name("meta.json")).read_text())["dtype"]
