"""Overrides that shrink every recipe to a few CPU seconds (tiny models, a few steps, small
data written by `fake_datasets` where a recipe needs a real data set)."""

from pathlib import Path

from helpers.fake_datasets import write_fashion_mnist, write_ptb

# every run: a few steps, pruning reaches its target at step 2, minimal evaluation
COMMON = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.max_steps=4",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "pruning.start_step=0",
    "pruning.end_step=2",
    "pruning.frequency=1",
    "evaluate.latency_warmup=1",
    "evaluate.latency_repeats=2",
    "threads=1",
]

_LSTM = ["model.embedding_dim=50", "model.hidden_size=50"]
_PTB = ["data.batch_size=4", "data.eval_batch_size=2", "data.bptt=5"]

# recipe -> its own shrinking overrides ({data} is replaced by the fake data folder)
PER_RECIPE = {
    "quickstart": ["model.hidden_sizes=[64,64]"],
    "lstm_ptb": [*_LSTM, *_PTB, "data.root={data}"],
    "lstm_ptb_small": [*_LSTM, *_PTB, "data.root={data}"],
    "transformer_ptb": [
        "model.d_model=32",
        "model.nhead=2",
        "model.dim_feedforward=64",
        "model.max_len=16",
        *_PTB,
        "data.root={data}",
    ],
    "cnn_fashion_mnist": [
        "model.channels=[4,16]",
        "model.hidden_size=32",
        "data.root={data}",
        "data.val_size=20",
        "data.batch_size=16",
    ],
}


# recipes whose tiny end-to-end run lives in another test file (heavier set-up of their own)
TESTED_ELSEWHERE = {"minilm_sst2": "test_hf_sst2.py"}


def fake_data(recipe: str, root: Path) -> Path:
    """Write the fake data set a recipe reads into `root` and return its folder."""
    if "ptb" in recipe:
        return write_ptb(root / "ptb")
    if "fashion" in recipe:
        return write_fashion_mnist(root / "fashion_mnist")
    return root


def tiny(recipe: str, tmp: Path, *extra: str) -> list[str]:
    """All overrides for a tiny run of `recipe` writing into `tmp/run`."""
    data = fake_data(recipe, tmp)
    own = [o.format(data=data) for o in PER_RECIPE[recipe]]
    return [f"recipe={recipe}", f"output_dir={tmp / 'run'}", *COMMON, *own, *extra]
