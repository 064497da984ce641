"""Token files as users have them: nanoGPT's flat .bin and a Megatron / GPT-NeoX indexed dataset (written here
by megatron-core's own builder), read without Megatron; bad files refused in one line before launch."""
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_plan, train_together

from parallelkit.config.errors import ConfigError
from parallelkit.data.tokens import megatron_paths, open_tokens

VOCAB = 512  # model=tiny


def learnable(n: int, seed: int = 0) -> np.ndarray:
    """A stream a tiny model learns in a few steps: each id is the previous one plus 7 (mod the vocabulary),
    restarting at a random id every 100."""
    starts = np.random.default_rng(seed).integers(0, VOCAB, n // 100 + 1)
    i = np.arange(n)
    return ((starts[i // 100] + 7 * (i % 100)) % VOCAB).astype(np.uint16)


def megatron_dataset(prefix: Path, docs: list[np.ndarray]) -> None:
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    builder = indexed.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokens")
    stream = learnable(60_000)
    stream.tofile(tmp / "train.bin")  # as nanoGPT's prepare.py writes it
    docs = np.split(stream, [7_000, 19_000, 40_000, 41_000])  # documents of uneven lengths
    megatron_dataset(tmp / "corpus", docs)
    return tmp, stream, docs


def test_megatron_index_reads_as_megatron_reads_it(corpora):
    tmp, stream, docs = corpora
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    theirs = IndexedDataset(str(tmp / "corpus"))
    assert len(theirs) == len(docs) and all(np.array_equal(theirs[i], d) for i, d in enumerate(docs))
    for path in ("corpus", "corpus.bin", "corpus.idx"):  # the prefix, or either file of the pair
        ours = open_tokens("megatron", str(tmp / path))
        assert ours.dtype == np.uint16 and np.array_equal(ours, np.concatenate([theirs[i] for i in range(len(theirs))]))
    assert np.array_equal(open_tokens("nanogpt", str(tmp / "train.bin"), "uint16"), stream)


def test_nanogpt_and_megatron_files_train(corpora, tmp_path):
    tmp, _, _ = corpora
    common = ["strategy=ddp", "train.steps=12", "optim.lr=3e-3", "optim.warmup_steps=0"]
    runs = train_together(tmp_path, {"nanogpt": [*common, "data=nanogpt", f"data.path={tmp / 'train.bin'}"],
                                     "megatron": [*common, "data=megatron", f"data.path={tmp / 'corpus'}"]})
    for name, s in runs.items():
        # it learns the +7 rule: uniform ids would hold the loss near ln(512) = 6.24 (~5.5 after 12 steps here)
        assert s["losses"][-1] < s["losses"][0] - 0.5, (name, s["losses"])


def _bad(tmp: Path, corpora_dir: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "odd.bin").write_bytes(b"\x01\x00\x02")
    np.array([1, 2, 3, 900, 4] * 100, np.uint16).tofile(tmp / "wide.bin")
    for suffix in (".bin", ".idx"):  # a pair whose index is cut short, and one whose .bin is
        for cut in ("idx", "bin"):
            src = (corpora_dir / "corpus").with_suffix(suffix)
            data = src.read_bytes()
            (tmp / f"cut{cut}{suffix}").write_bytes(data[:-40] if suffix == f".{cut}" else data)
    (tmp / "fake.idx").write_bytes(b"not an index")
    (tmp / "fake.bin").write_bytes(b"\x00" * 100)
    return {
        "odd": (["data=nanogpt", f"data.path={tmp / 'odd.bin'}"], "holds 3 bytes, not a whole number of uint16 tokens"),
        "vocab": (["data=nanogpt", f"data.path={tmp / 'wide.bin'}"], "token 900 at position 3 is outside model.vocab_size=512"),
        "dtype": (["data=nanogpt", f"data.path={corpora_dir / 'train.bin'}", "data.dtype=uint32"], "outside model.vocab_size"),
        "cut index": (["data=megatron", f"data.path={tmp / 'cutidx'}"], "cutidx.idx is truncated"),
        "cut bin": (["data=megatron", f"data.path={tmp / 'cutbin'}"], "its index counts"),
        "not an index": (["data=megatron", f"data.path={tmp / 'fake'}"], "is not a Megatron index"),
        "no idx": (["data=megatron", f"data.path={corpora_dir / 'train'}"], "train.idx does not exist"),
        "no path": (["data=nanogpt"], "data=nanogpt needs data.path"),
    }


def test_bad_token_files_are_one_line_before_launch(corpora, tmp_path):
    for name, (overrides, says) in _bad(tmp_path, corpora[0]).items():
        with pytest.raises(ConfigError) as e:
            compose_plan(*overrides)
        msg = str(e.value)
        assert "\n" not in msg and says in msg and msg.startswith("data"), (name, msg)


def test_megatron_paths():
    assert megatron_paths("/d/x") == megatron_paths("/d/x.bin") == megatron_paths("/d/x.idx") == (Path("/d/x.bin"),
                                                                                                  Path("/d/x.idx"))


# ---- data=corpus: text through a real tokenizer ----
def test_a_corpus_is_tokenized_once_and_trains(tmp_path):
    from parallelkit.data.corpus import prepare, token_file
    from parallelkit.data.datasets import make_dataset

    text = tmp_path / "text"
    text.mkdir()
    for i in range(3):  # a few files of repetitive prose: a 300-token BPE learns its words
        (text / f"{i}.txt").write_text(" ".join(f"the {w} of file {i} is not the {w} of the others." for w in
                                                 ("cat", "dog", "sun", "moon", "tree", "river")) * 60)
    common = ["data=corpus", f"data.path={text}", "data.tokenizer_vocab=300", "train.steps=12", "optim.lr=3e-3"]
    plan = compose_plan(*common)
    path = token_file(plan.cfg.data)
    assert not path.exists()
    assert prepare(plan.cfg.data) == path and path.is_file() and (path.parent / "tokenizer.json").is_file()
    stamp = path.stat().st_mtime_ns
    ds = make_dataset(plan.cfg.data, plan.cfg.model, 0)  # the cached file, not a second tokenization
    assert path.stat().st_mtime_ns == stamp and int(ds.data.max()) < 300 and len(ds.sample(0)) == 65
    s = train_together(tmp_path, {"ddp": ["strategy=ddp", *common]})["ddp"]
    assert s["losses"][-1] < 0.8 * s["losses"][0], s["losses"]
    # its own tokenizer.json as data.tokenizer: the same ids
    again = compose_plan("data=corpus", f"data.path={text}", f"data.tokenizer={path.parent / 'tokenizer.json'}")
    assert np.array_equal(open_tokens("nanogpt", str(prepare(again.cfg.data)), "uint16"), ds.data)


def test_a_corpus_whose_tokenizer_outgrows_the_model_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="the tokenizer has 8192 tokens, model.vocab_size=512 fewer: set model.vocab_size=8192"):
        compose_plan("data=corpus")
    with pytest.raises(ConfigError, match="data.tokenizer=/no/tokenizer.json: no such tokenizer.json"):
        compose_plan("data=corpus", "data.tokenizer=/no/tokenizer.json")
    with pytest.raises(ConfigError, match="data.path='/no/such/text' does not exist"):
        compose_plan("data=corpus", "data.path=/no/such/text", "data.tokenizer_vocab=300")
