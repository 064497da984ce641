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
