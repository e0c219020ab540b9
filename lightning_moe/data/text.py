"""User text through Hugging Face ``datasets`` and ``tokenizers`` (both optional, imported on use)."""

from __future__ import annotations

import codecs
import os

import torch

from lightning_moe.data.windows import TokenWindows, WindowDataModule, check_loader_args, split_generator
from lightning_moe.utils import check_positive

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_EOS = "<|endoftext|>"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"TextDataModule needs `{module}`: pip install 'lightning-moe[text]'.") from e


def _check_file(path: str) -> None:
    """A data file that ``datasets`` would fail on with a bare ``DatasetGenerationError``: a directory, an empty
    file, or (for the text formats) binary or non-UTF-8 content, judged from its first 64 KiB."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"data_files entry {path!r} is a directory; list the files inside it instead.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"data_files entry {path!r} is empty; remove it or point at a file with text.")
    if os.path.splitext(path)[1].lower() == ".parquet":
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        raise ValueError(f"data_files entry {path!r} holds binary data (NUL bytes); pass text files (.txt, .jsonl, "
                         ".csv) or .parquet.")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # final=False: a character cut at 64 KiB is fine
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data_files entry {path!r} is not UTF-8 (byte 0x{head[err.start]:02x} at offset {err.start}); convert "
            "it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`."
        ) from None


class TextDataModule(WindowDataModule):
    """Next-token windows over your own text, with a trained or loaded ``tokenizers`` tokenizer.

    Args:
        data_files: local file(s) (.txt, .json/.jsonl, .csv, .parquet); the builder follows the extension.
        dataset_name: a ``datasets`` name or local dataset directory, used when ``data_files`` is not given.
        dataset_config: configuration name for ``dataset_name``.
        text_column: column holding the text.
        tokenizer: path of a ``tokenizer.json`` to load; if None a byte-level BPE is trained on the training split.
        vocab_size: vocabulary size of the trained tokenizer.
        save_tokenizer: where to write the trained tokenizer (``tokenizer.json``); None = do not save.
        seq_len: tokens per window.
        batch_size: windows per batch.
        val_fraction: share of documents held out for validation.
        seed: seed of the train/validation split.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        data_files: str | list[str] | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        save_tokenizer: str | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (data_files is None) == (dataset_name is None):
            raise ValueError("Give exactly one of `data_files` (local files) or `dataset_name`.")
        check_loader_args(seq_len, batch_size, num_workers)
        check_positive("vocab_size", vocab_size)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}.")
        self.data_files = [data_files] if isinstance(data_files, str) else data_files
        self.dataset_name, self.dataset_config, self.text_column = dataset_name, dataset_config, text_column
        self.tokenizer_path, self._vocab_size, self.save_tokenizer = tokenizer, vocab_size, save_tokenizer
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.seed, self.num_workers = seed, num_workers
        self.tokenizer = None
        self.splits: dict[str, TokenWindows] = {}
        if tokenizer is not None:
            if not os.path.isfile(tokenizer):
                raise FileNotFoundError(
                    f"tokenizer={tokenizer!r} is not a file; pass the tokenizer.json a previous run wrote with "
                    "save_tokenizer, or leave tokenizer unset to train one on the training split."
                )
            self.tokenizer = _require("tokenizers").Tokenizer.from_file(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size() if self.tokenizer is not None else self._vocab_size

    def _load_texts(self) -> list[str]:
        datasets = _require("datasets")
        if self.data_files is not None:
            exts = {os.path.splitext(f)[1].lower() for f in self.data_files}
            missing = [f for f in self.data_files if not os.path.exists(f)]
            if missing:
                raise FileNotFoundError(f"data_files not found: {missing}.")
            for f in self.data_files:
                _check_file(f)
            if len(exts) != 1 or next(iter(exts)) not in _BUILDERS:
                raise ValueError(f"data_files must share one extension of {sorted(_BUILDERS)}, got {sorted(exts)}.")
            ds = datasets.load_dataset(_BUILDERS[exts.pop()], data_files=self.data_files, split="train")
        else:
            ds = datasets.load_dataset(self.dataset_name, self.dataset_config, split="train")
        if self.text_column not in ds.column_names:
            raise ValueError(f"text_column={self.text_column!r} not in the dataset's columns {ds.column_names}.")
        return [t for t in ds[self.text_column] if t]

    def _train_tokenizer(self, texts: list[str]):
        tk = _require("tokenizers")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=self._vocab_size, special_tokens=[_EOS],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        if self.save_tokenizer:
            tokenizer.save(self.save_tokenizer)
        return tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        texts = self._load_texts()
        if len(texts) < 2:
            raise ValueError(f"need at least 2 non-empty documents for a train/validation split, got {len(texts)}.")
        order = torch.randperm(len(texts), generator=split_generator(self.seed)).tolist()
        n_val = max(1, round(len(texts) * self.val_fraction))
        parts = {"val": [texts[i] for i in order[:n_val]], "train": [texts[i] for i in order[n_val:]]}
        if self.tokenizer is None:
            self.tokenizer = self._train_tokenizer(parts["train"])
        eos = self.tokenizer.token_to_id(_EOS)
        for split, docs in parts.items():
            ids: list[int] = []
            for enc in self.tokenizer.encode_batch(docs):
                ids += enc.ids + ([eos] if eos is not None else [])
            self.splits[split] = TokenWindows(torch.tensor(ids, dtype=torch.int32), self.seq_len)
