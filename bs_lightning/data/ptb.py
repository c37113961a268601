"""Penn Treebank (Mikolov's 10k-word version) as a LightningDataModule for word-level
language modelling with truncated back-propagation through time."""

from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from bs_lightning.data.split_datamodule import SplitDataModule, check_sizes

HUB_NAME = "ptb_text_only"
EOS = "<eos>"
UNK = "<unk>"
# our split name -> file suffix of the local release (ptb.train.txt, ...)
_LOCAL_SPLITS = {"train": "train", "val": "valid", "test": "test"}
# our split name -> split name on the hub
_HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}


class BPTTWindows(Dataset):
    """A token stream cut into `batch_size` parallel rows and read in windows of `bptt` tokens.

    Row `r` holds the `r`-th contiguous segment of the stream, so window `i + 1` continues
    every row of window `i`: a model may carry its hidden state from one window to the next
    (read the windows in order, no shuffling). Item `i` is a ready batch
    `(x [batch_size, t], y [batch_size, t])` with `y` the next token of `x` and `t = bptt`
    except in the last, shorter window.

    Args:
        stream: token ids `[n]`.
        batch_size: parallel rows.
        bptt: tokens per window.

    Raises:
        ValueError: if the stream is too short for one window of one token per row.
    """

    def __init__(self, stream: torch.Tensor, batch_size: int, bptt: int) -> None:
        n_cols = stream.numel() // batch_size
        if n_cols < 2:
            raise ValueError(
                f"PTB stream of {stream.numel()} tokens is too short for batch_size={batch_size}"
            )
        self.rows = stream[: batch_size * n_cols].view(batch_size, n_cols)  # [batch, n_cols]
        self.bptt = bptt

    def __len__(self) -> int:
        return -(-(self.rows.size(1) - 1) // self.bptt)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.bptt
        end = min(start + self.bptt, self.rows.size(1) - 1)
        return self.rows[:, start:end], self.rows[:, start + 1 : end + 1]


class PTBDataModule(SplitDataModule):
    """PTB for language modelling: the vocabulary of the training split plus `<eos>` at the end
    of every line (10,000 words in the standard release), tokens outside it map to `<unk>`.

    Reads `ptb.train.txt`, `ptb.valid.txt` and `ptb.test.txt` from `root` with the `datasets`
    "text" loader; with `root=None` it loads the hub data set `ptb_text_only` (online).
    Batches are `(x [batch, t], y [batch, t])` int64 windows from `BPTTWindows`.

    Args:
        root: folder of the three text files, or None for the hub.
        batch_size: parallel streams of the training split.
        eval_batch_size: parallel streams of the validation and test splits.
        bptt: tokens per window.
        max_train_tokens: keep only the first N tokens of the training stream (None = all).
        max_eval_tokens: keep only the first N tokens of the validation and test streams.

    Raises:
        ValueError: for a size < 1.
        FileNotFoundError: at `setup()`, when the files are missing (or the hub unreachable
            with `root=None`); the message says where it looked and how to get PTB.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 20,
        eval_batch_size: int = 10,
        bptt: int = 35,
        max_train_tokens: int | None = None,
        max_eval_tokens: int | None = None,
    ) -> None:
        super().__init__()
        check_sizes(
            "PTBDataModule",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            bptt=bptt,
            max_train_tokens=max_train_tokens,
            max_eval_tokens=max_eval_tokens,
        )
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.bptt = bptt
        self.max_train_tokens = max_train_tokens
        self.max_eval_tokens = max_eval_tokens
        self.vocab: dict[str, int] = {}
        self.streams: dict[str, torch.Tensor] = {}

    def _read_lines(self) -> dict[str, list[str]]:
        import datasets

        if self.root is not None:
            root = Path(self.root)
            files = {s: root / f"ptb.{suffix}.txt" for s, suffix in _LOCAL_SPLITS.items()}
            missing = [str(p) for p in files.values() if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"PTB not found: data.root={self.root} lacks {', '.join(missing)}. "
                    "Get ptb.train.txt, ptb.valid.txt and ptb.test.txt (data/ folder of "
                    "Mikolov's simple-examples.tgz, or the 'ptb_text_only' data set on the "
                    "Hugging Face hub) into one folder and set data.root to it, or set "
                    "data.root=null to load the hub data set when online."
                )
            loaded = datasets.load_dataset("text", data_files={s: str(p) for s, p in files.items()})
            return {s: loaded[s]["text"] for s in _LOCAL_SPLITS}
        try:
            loaded = datasets.load_dataset(HUB_NAME)
        except Exception as err:  # offline or hub error: one clear message instead
            raise FileNotFoundError(
                f"PTB not found: data.root is null and the Hugging Face hub data set "
                f"{HUB_NAME!r} could not be loaded ({type(err).__name__}: {err}). Go online, "
                "or put ptb.train.txt, ptb.valid.txt and ptb.test.txt in a folder and set "
                "data.root to it."
            ) from err
        return {s: loaded[hub]["sentence"] for s, hub in _HUB_SPLITS.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.streams:
            return
        lines = self._read_lines()
        words = {
            split: [w for line in text for w in line.split() + [EOS]]
            for split, text in lines.items()
        }
        counts = Counter(words["train"])
        counts.setdefault(UNK, 0)
        # most frequent first, ties alphabetical: a deterministic vocabulary
        ordered = sorted(counts, key=lambda w: (-counts[w], w))
        self.vocab = {w: i for i, w in enumerate(ordered)}
        unk = self.vocab[UNK]
        limits = {"train": self.max_train_tokens}
        limits.update(val=self.max_eval_tokens, test=self.max_eval_tokens)
        for split, ws in words.items():
            ws = ws[: limits[split]] if limits[split] is not None else ws
            self.streams[split] = torch.tensor([self.vocab.get(w, unk) for w in ws])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def model_kwargs(self) -> dict:
        return {"vocab_size": self.vocab_size}

    def _loader(self, split: str, train: bool) -> DataLoader:
        batch_size = self.batch_size if train else self.eval_batch_size
        windows = BPTTWindows(self.streams[split], batch_size, self.bptt)
        # batch_size=None: each item already is a batch; no shuffling, even for training:
        # the models carry their state from one window to the next
        return DataLoader(windows, batch_size=None, shuffle=False)
