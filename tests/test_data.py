"""DataModules: the embedded byte corpus and user text through datasets + tokenizers."""

import pytest
import torch

from lightning_moe.data import DOMAINS, ByteCorpusDataModule, build_byte_corpus


def test_byte_corpus_labels_each_byte_with_its_domain():
    corpus = build_byte_corpus(20_000, 0.1, seed=0)
    tokens, domains = corpus["train"]
    assert tokens.shape == domains.shape and set(domains.unique().tolist()) == {0, 1}
    # Each domain gets exactly the requested budget across the two splits.
    for d in range(len(DOMAINS)):
        assert sum(int((corpus[s][1] == d).sum()) for s in corpus) == 20_000


def test_validation_documents_are_held_out_whole():
    corpus = build_byte_corpus(20_000, 0.2, seed=0)
    train = bytes(corpus["train"][0].tolist())
    val = bytes(corpus["val"][0].tolist())
    assert len(val) > 0.1 * 40_000
    assert val[:200] not in train


def test_batches_carry_next_byte_labels_and_domains():
    dm = ByteCorpusDataModule(seq_len=32, batch_size=4, bytes_per_domain=20_000)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == batch["labels"].shape == batch["domain_ids"].shape == (4, 32)
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])


def test_corpus_is_deterministic_for_a_seed():
    a, b = build_byte_corpus(10_000, 0.1, 3), build_byte_corpus(10_000, 0.1, 3)
    assert torch.equal(a["train"][0], b["train"][0])


@pytest.mark.parametrize("kwargs,match", [(dict(seq_len=0), "seq_len"), (dict(val_fraction=1.0), "val_fraction"),
                                           (dict(bytes_per_domain=-1), "bytes_per_domain")])
def test_bad_byte_corpus_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ByteCorpusDataModule(**kwargs)


def test_text_datamodule_trains_a_tokenizer_on_local_files(tmp_path):
    pytest.importorskip("datasets", reason="TextDataModule needs the `text` extra (datasets)")
    pytest.importorskip("tokenizers", reason="TextDataModule needs the `text` extra (tokenizers)")
    from lightning_moe.data import TextDataModule

    lines = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    dm = TextDataModule(data_files=str(path), vocab_size=300, seq_len=16, batch_size=4,
                        save_tokenizer=str(tmp_path / "tok.json"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == (4, 16) and int(batch["tokens"].max()) < dm.vocab_size <= 300
    assert (tmp_path / "tok.json").exists()
    reloaded = TextDataModule(data_files=str(path), tokenizer=str(tmp_path / "tok.json"), seq_len=16)
    assert reloaded.vocab_size == dm.vocab_size


def test_text_datamodule_needs_exactly_one_source():
    from lightning_moe.data import TextDataModule

    with pytest.raises(ValueError, match="exactly one of `data_files`"):
        TextDataModule()


def test_validation_prefix_samples_both_domains():
    dm = ByteCorpusDataModule(seq_len=64, batch_size=8, bytes_per_domain=100_000)
    dm.setup("validate")
    first = next(iter(dm.val_dataloader()))["domain_ids"]
    assert set(first.unique().tolist()) == {0, 1}
    again = next(iter(dm.val_dataloader()))["domain_ids"]
    assert torch.equal(first, again)
