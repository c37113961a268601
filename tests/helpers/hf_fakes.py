"""Stand-ins for the SST-2 recipe's inputs: a tiny BERT with its own WordPiece tokenizer saved
as a Hugging Face model folder, and SST-2 files in the real GLUE .tsv format."""

import random
from pathlib import Path

from transformers import BertTokenizer

from helpers import tiny_bert

POSITIVE = ["good", "great", "fun", "moving"]
NEGATIVE = ["bad", "awful", "dull", "boring"]
FILLER = ["the", "a", "movie", "film", "is", "was", "very", "plot", ".", ","]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(root: Path, hidden: int = 32, intermediate: int = 64) -> Path:
    """Save a randomly initialised 2-layer `BertModel` and its tokenizer into `root`.

    The vocabulary is the [PAD]/[UNK]/[CLS]/[SEP]/[MASK] tokens plus the words of the fake
    sentences; `[PAD]` has id 0 as in BERT.
    """
    root.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + POSITIVE + NEGATIVE + FILLER
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(root)
    tiny_bert(
        vocab_size=len(vocab), hidden=hidden, intermediate=intermediate, max_positions=64
    ).save_pretrained(root)
    return root


def write_sst2(root: Path, sizes: tuple[int, int, int] = (64, 24, 24)) -> Path:
    """Write train.tsv, dev.tsv and test.tsv ('sentence<TAB>label' with a header).

    A sentence is 2-14 filler words with one sentiment word; its label is 1 for a positive
    word, 0 for a negative one.
    """
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in zip(("train.tsv", "dev.tsv", "test.tsv"), sizes, strict=True):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 14))]
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
            lines.append(" ".join(words) + " \t" + str(label))
        (root / name).write_text("\n".join(lines) + "\n")
    return root
