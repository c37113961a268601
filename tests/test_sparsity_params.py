"""Prunable-parameter discovery: module types, include/exclude globs, asked-for params."""

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

from bs_lightning.sparsity import default_prunable_names, find_prunable, matrix_view


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 8, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(8, 4)
        self.conv = nn.Conv2d(4, 8, 3, groups=2)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16)
        self.gpt = Conv1D(12, 8)
        self.norm = nn.LayerNorm(8)
        self.deconv = nn.ConvTranspose2d(4, 4, 3)
        self.head = nn.Linear(8, 10)
        self.head.weight = self.embed.weight  # tied: counts as the embedding


def names(entries):
    return [e.name for e in entries]


def test_default_selection():
    got = names(find_prunable(Zoo()))
    lstm = [
        f"lstm.weight_{w}_l{i}{d}" for i in (0, 1) for d in ("", "_reverse") for w in ("ih", "hh")
    ]
    assert got == (
        ["fc.weight"]
        + lstm
        + ["gru.weight_ih_l0", "gru.weight_hh_l0", "conv.weight"]
        + ["enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight"]
        + ["enc.linear1.weight", "enc.linear2.weight", "gpt.weight"]
    )


def test_no_biases_norms_embeddings_by_default():
    got = names(find_prunable(Zoo()))
    assert not any("bias" in n or "norm" in n or "embed" in n or "deconv" in n for n in got)


def test_include_exclude_globs():
    zoo = Zoo()
    assert names(find_prunable(zoo, include="lstm", exclude="*_reverse")) == [
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
    ]
    assert names(find_prunable(zoo, include=["enc.*", "fc"], exclude=["enc.self_attn*"])) == [
        "fc.weight",
        "enc.linear1.weight",
        "enc.linear2.weight",
    ]
    assert names(find_prunable(zoo, include=["lstm.weight_hh_l1"])) == ["lstm.weight_hh_l1"]


def test_embedding_pruned_only_when_asked():
    zoo = Zoo()
    assert names(find_prunable(zoo, include=["embed.weight", "fc"])) == [
        "embed.weight",
        "fc.weight",
    ]
    # a module-name match does not select a non-default parameter
    with pytest.raises(
        ValueError,
        match=r"include glob 'embed' matches no module or parameter of Zoo that can be pruned",
    ):
        find_prunable(zoo, include="embed")


def test_mha_separate_projections():
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert default_prunable_names(mha) == ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    assert matrix_view(mha, "k_proj_weight").shape == (8, 4)


def test_include_matching_nothing_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"include glob 'lstm2' matches no module or parameter of Zoo that can be pruned; prunable parameters: \['fc.weight', 'lstm.weight_ih_l0'",
    ):
        find_prunable(Zoo(), include=["lstm2"])


def test_exclude_matching_nothing_raises():
    with pytest.raises(
        ValueError,
        match=r"exclude glob 'nope' matches no module or selected parameter; selected parameters: \['fc.weight'\]",
    ):
        find_prunable(Zoo(), include="fc", exclude="nope")


def test_empty_selection_raises():
    with pytest.raises(
        ValueError,
        match=r"no layer of Zoo selected: include=\['fc'\] and exclude=\['fc'\] leave no parameter to prune",
    ):
        find_prunable(Zoo(), include=["fc"], exclude=["fc"])


def test_model_without_matrices_raises():
    with pytest.raises(
        ValueError, match="LayerNorm has no parameter with >= 2 dimensions to prune"
    ):
        find_prunable(nn.LayerNorm(4))
