"""SST-2 (binary sentiment, GLUE) as a LightningDataModule of token ids for a HF classifier."""

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from bs_lightning.data.split_datamodule import SplitDataModule, check_sizes
from bs_lightning.data.splits import split_indices
from bs_lightning.hf.paths import resolve_model_path

HUB_NAME = ("glue", "sst2")
# local files: our split name -> file in `root` (tab-separated, header `sentence\tlabel`)
_LOCAL_FILES = {"train": "train.tsv", "val": "dev.tsv", "test": "test.tsv"}
# fraction of the hub's training split held out for validation (the hub's "validation" split,
# 872 labelled sentences, is our test split; its "test" split has no labels)
_HUB_VAL_FRACTION = 0.1


def read_sst2_tsv(path: Path) -> tuple[list[str], list[int]]:
    """Reads a GLUE-style SST-2 file: a header line, then `sentence<TAB>label` per line.

    Returns:
        `(sentences, labels)` with labels in {0, 1}.

    Raises:
        ValueError: naming the file and line when a line is malformed.
    """
    sentences, labels = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["sentence", "label"]:
            raise ValueError(f"{path}: expected the header 'sentence<TAB>label', got {header}")
        for lineno, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {line!r}")
            sentences.append(parts[0].strip())
            labels.append(int(parts[1]))
    return sentences, labels


class LengthBatches(Sampler[list[int]]):
    """Batches of sentences of similar length, so little of a batch is padding.

    Training (`shuffle=True`): every epoch, shuffle all sentences, cut them into pools of
    `pool_batches` batches, sort each pool by length, cut it into batches and shuffle the
    batches. Evaluation (`shuffle=False`): all sentences sorted by length, longest first (the
    order does not change accuracy; the first test row, which `bs_lightning.evaluate` times
    for latency, is then the longest sentence rather than a two-word one).

    Args:
        lengths: token count of every sentence.
        batch_size: sentences per batch.
        shuffle: training order (see above) or a fixed length order.
        pool_batches: batches per sorted pool when shuffling.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, shuffle: bool, pool_batches: int = 50
    ) -> None:
        self.lengths = torch.tensor(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.pool = pool_batches * batch_size

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        if not self.shuffle:
            order = torch.sort(self.lengths, descending=True, stable=True).indices
            yield from (b.tolist() for b in order.split(self.batch_size))
            return
        # the global generator: seeded by the run's seed (lightning.seed_everything)
        perm = torch.randperm(len(self.lengths))
        batches = []
        for pool in perm.split(self.pool):
            by_length = pool[torch.sort(self.lengths[pool], stable=True).indices]
            batches += list(by_length.split(self.batch_size))
        for i in torch.randperm(len(batches)).tolist():
            yield batches[i].tolist()


class SST2DataModule(SplitDataModule):
    """SST-2 sentences tokenised for a Hugging Face model, padded per batch.

    Local folder (`root`): `train.tsv`, `dev.tsv` (validation) and `test.tsv` (the 872
    sentences of GLUE's validation split, which has labels). `root=None` loads the hub data set
    `glue/sst2`: 10% of its training split is held out for validation and its validation
    split is the test split.

    Batches are `(x [batch, t] int64 token ids, right-padded with the tokenizer's pad id,
    y [batch] int64)`, `t` the longest sentence of the batch (at most `max_length`); batches
    group sentences of similar length (`LengthBatches`) to spend little time on padding. The
    model derives the attention mask from the pad id (`model_kwargs()["pad_token_id"]`).

    Args:
        root: folder of the three .tsv files, or None for the hub.
        tokenizer: tokenizer folder or name (see `bs_lightning.hf.paths.resolve_model_path`),
            normally the model's.
        max_length: longest tokenised sentence, special tokens included; longer ones are cut.
        batch_size: sentences per training batch.
        eval_batch_size: sentences per validation and test batch.
        max_train_samples: keep a random subset of this many training sentences (None = all).
        max_val_samples: keep the first N validation sentences (None = all).
        seed: seed of the training subset and of the hub's validation split.

    Raises:
        ValueError: for a size < 1 (`max_length` < 3 leaves no room for a word).
        FileNotFoundError: at `setup()`, when a file is missing (or the hub unreachable with
            `root=None`), saying where it looked.
    """

    num_classes = 2

    def __init__(
        self,
        root: str | None = None,
        tokenizer: str = "all-MiniLM-L6-v2",
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_sizes(
            "SST2DataModule",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            max_train_samples=max_train_samples,
            max_val_samples=max_val_samples,
        )
        if max_length < 3:  # [CLS] word [SEP]
            raise ValueError(f"SST2DataModule: max_length must be >= 3, got {max_length}")
        self.root = root
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.seed = seed
        self.pad_token_id: int | None = None
        # split -> (token id lists, labels)
        self.splits: dict[str, tuple[list[list[int]], list[int]]] = {}

    def _read_local(self) -> dict[str, tuple[list[str], list[int]]]:
        root = Path(self.root)
        files = {split: root / name for split, name in _LOCAL_FILES.items()}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"SST-2 not found: data.root={self.root} lacks {', '.join(missing)}. Put "
                "train.tsv, dev.tsv and test.tsv ('sentence<TAB>label' with a header) in one "
                "folder and set data.root to it, or data.root=null to load glue/sst2 from the "
                "hub when online."
            )
        return {split: read_sst2_tsv(p) for split, p in files.items()}

    def _read_hub(self) -> dict[str, tuple[list[str], list[int]]]:
        import datasets

        try:
            loaded = datasets.load_dataset(*HUB_NAME)
        except Exception as err:  # offline or hub error: one clear message instead
            raise FileNotFoundError(
                f"SST-2 not found: data.root is null and the hub data set {'/'.join(HUB_NAME)} "
                f"could not be loaded ({type(err).__name__}: {err}). Go online or set data.root "
                "to a folder with train.tsv, dev.tsv and test.tsv."
            ) from err
        train = loaded["train"]
        val_idx, train_idx = split_indices(len(train), (_HUB_VAL_FRACTION,), self.seed)

        def pick(idx: torch.Tensor) -> tuple[list[str], list[int]]:
            rows = train.select(idx.tolist())
            return list(rows["sentence"]), list(rows["label"])

        test = loaded["validation"]
        return {
            "train": pick(train_idx),
            "val": pick(val_idx),
            "test": (list(test["sentence"]), list(test["label"])),
        }

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_name))
        # decoder-only tokenizers (GPT-2) have no pad token: pad with end-of-sequence
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        raw = self._read_local() if self.root is not None else self._read_hub()
        sentences, labels = raw["train"]
        if self.max_train_samples is not None and self.max_train_samples < len(labels):
            subset, _ = split_indices(
                len(labels), (self.max_train_samples / len(labels),), self.seed
            )
            sentences = [sentences[i] for i in subset.tolist()]
            labels = [labels[i] for i in subset.tolist()]
            raw["train"] = (sentences, labels)
        if self.max_val_samples is not None:
            raw["val"] = tuple(part[: self.max_val_samples] for part in raw["val"])
        for split, (text, y) in raw.items():
            ids = tok(text, truncation=True, max_length=self.max_length)["input_ids"]
            self.splits[split] = (ids, y)

    def model_kwargs(self) -> dict:
        return {"num_classes": self.num_classes, "pad_token_id": self.pad_token_id}

    def _collate(self, items: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        x = torch.full((len(items), width), self.pad_token_id, dtype=torch.int64)  # [batch, t]
        for row, (ids, _) in enumerate(items):
            x[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        y = torch.tensor([label for _, label in items], dtype=torch.int64)  # [batch]
        return x, y

    def _loader(self, split: str, train: bool) -> DataLoader:
        ids, labels = self.splits[split]
        batch_size = self.batch_size if train else self.eval_batch_size
        batches = LengthBatches([len(i) for i in ids], batch_size, shuffle=train)
        return DataLoader(
            list(zip(ids, labels, strict=True)), batch_sampler=batches, collate_fn=self._collate
        )
