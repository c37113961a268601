"""Sparse attention and Transformer layers: same outputs as torch's dense modules in eval."""

import pytest
import torch
from torch import nn

from bs_lightning import SparsityPlan, convert_to_sparse
from bs_lightning.nn import (
    BalancedSparseLinear,
    BalancedSparseMultiheadAttention,
    BalancedSparseTransformerEncoderLayer,
)
from bs_lightning.sparsity import BalancedPattern, find_prunable, prune_once_

E, H, L, S, N = 32, 4, 5, 7, 3


def _pruned(module: nn.Module, sparsity: float = 0.75, bank: int = 8) -> SparsityPlan:
    """Prunes every prunable matrix of `module` (attention in_proj and out_proj included)."""
    torch.manual_seed(0)
    for p in module.parameters():  # not torch's near-zero init: make every weight matter
        nn.init.normal_(p, std=0.3)
    return prune_once_(find_prunable(module), BalancedPattern(bank), sparsity)


def _inputs(batch_first: bool, shape_q=(N, L), shape_kv=(N, S)):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(*shape_q, E, generator=g)
    kv = torch.randn(*shape_kv, E, generator=g)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    return q, kv


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self", "cross_kv", "cross_all"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_attention_matches_dense(batch_first, kind, need_weights):
    dense = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    plan = _pruned(dense)
    q, kv = _inputs(batch_first)
    if kind == "self":
        args = (q, q, q)
    elif kind == "cross_kv":
        args = (q, kv, kv)
    else:
        args = (q, kv, kv + 1.0)
    # key padding (bool) and an additive attention mask
    src = args[1].shape[1 if batch_first else 0]
    tgt = q.shape[1 if batch_first else 0]
    padding = torch.zeros(N, src, dtype=torch.bool)
    padding[0, -2:] = True
    attn_mask = torch.randn(tgt, src, generator=torch.Generator().manual_seed(2))
    kwargs = dict(key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights)
    with torch.no_grad():
        want, want_w = dense(*args, **kwargs)
        sparse = convert_to_sparse(dense, plan=plan)  # the root: its replacement comes back
        got, got_w = sparse(*args, **kwargs)
    assert type(sparse) is BalancedSparseMultiheadAttention
    assert type(sparse.in_proj) is BalancedSparseLinear
    assert type(sparse.out_proj) is BalancedSparseLinear
    _close(got, want)
    if need_weights:
        _close(got_w, want_w)
    else:
        assert got_w is None and want_w is None


def test_attention_masks_heads_and_unbatched():
    dense = nn.MultiheadAttention(E, H, batch_first=True).eval()
    plan = _pruned(dense)
    sparse = BalancedSparseMultiheadAttention.from_dense(
        dense, plan["in_proj_weight"].compact_layout, plan["out_proj.weight"].compact_layout
    ).eval()
    q, _ = _inputs(True)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    per_head = torch.randn(N * H, L, L, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for kwargs in (
            dict(attn_mask=causal, is_causal=True),
            dict(attn_mask=per_head, average_attn_weights=False),
        ):
            want, want_w = dense(q, q, q, **kwargs)
            got, got_w = sparse(q, q, q, **kwargs)
            _close(got, want)
            _close(got_w, want_w)
        x = q[0]  # unbatched [L, E]
        want, want_w = dense(x, x, x)
        got, got_w = sparse(x, x, x)
        _close(got, want)
        _close(got_w, want_w)
    _close(sparse.to_dense().in_proj_weight, dense.in_proj_weight)


def test_only_out_proj_planned_keeps_in_proj_dense():
    dense = nn.MultiheadAttention(E, H).eval()
    plan = _pruned(dense)
    sparse = convert_to_sparse(dense, plan=SparsityPlan([plan["out_proj.weight"]]))
    assert type(sparse.in_proj) is nn.Linear and type(sparse.out_proj) is BalancedSparseLinear
    q, _ = _inputs(False)
    with torch.no_grad():
        _close(sparse(q, q, q)[0], dense(q, q, q)[0])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_converts_fully_and_matches(batch_first, norm_first):
    layer = nn.TransformerEncoderLayer(
        E, H, 64, dropout=0.1, batch_first=batch_first, norm_first=norm_first
    )
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    plan = _pruned(encoder)
    x, _ = _inputs(batch_first)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, -2:] = True
    mask = torch.ones(L, L, dtype=torch.bool).triu(1)  # causal, the padding mask's type
    with torch.no_grad():
        want = encoder(x, mask=mask, src_key_padding_mask=padding)
        want_plain = encoder(x)
        convert_to_sparse(encoder, plan=plan)
        got = encoder(x, mask=mask, src_key_padding_mask=padding)
        got_plain = encoder(x)
    for enc_layer in encoder.layers:
        assert type(enc_layer) is BalancedSparseTransformerEncoderLayer
        assert type(enc_layer.self_attn) is BalancedSparseMultiheadAttention
        assert type(enc_layer.linear1) is BalancedSparseLinear
        assert type(enc_layer.linear2) is BalancedSparseLinear
    assert encoder.use_nested_tensor is False
    # padded positions are zeros on torch's nested-tensor path: compare the real ones
    keep = ~padding if batch_first else (~padding).t()
    _close(got[keep], want[keep])
    _close(got_plain, want_plain)


def test_decoder_layer_converts_its_children():
    layer = nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True).eval()
    plan = _pruned(layer)
    tgt, memory = _inputs(True)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    memory_padding = torch.zeros(N, S, dtype=torch.bool)
    memory_padding[2, :3] = True
    with torch.no_grad():
        want = layer(tgt, memory, tgt_mask=mask, memory_key_padding_mask=memory_padding)
        converted = convert_to_sparse(layer, plan=plan)
        got = converted(tgt, memory, tgt_mask=mask, memory_key_padding_mask=memory_padding)
    assert converted is layer
    assert type(layer.self_attn) is BalancedSparseMultiheadAttention
    assert type(layer.multihead_attn) is BalancedSparseMultiheadAttention
    assert type(layer.linear1) is BalancedSparseLinear
    _close(got, want)


def test_training_mode_runs_with_dropout():
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.5, batch_first=True)
    plan = _pruned(layer)
    sparse = convert_to_sparse(layer, plan=plan)
    assert type(sparse) is BalancedSparseTransformerEncoderLayer and sparse.training
    x, _ = _inputs(True)
    torch.manual_seed(0)
    a = sparse(x)
    torch.manual_seed(1)
    b = sparse(x)
    assert a.shape == x.shape and not torch.equal(a, b)  # dropout is active


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kdim": 16, "vdim": 16}, r"attention layer 'attn' has kdim=16, vdim=16 != embed_dim=32"),
        ({"add_bias_kv": True}, r"attention layer 'attn' uses add_bias_kv=True"),
        ({"add_zero_attn": True}, r"attention layer 'attn' uses add_zero_attn=True"),
    ],
)
def test_unconvertible_attention_raises_strict_and_warns_otherwise(kwargs, match):
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(E, H, **kwargs)})
    plan = _pruned(model)
    with pytest.raises(ValueError, match=match):
        convert_to_sparse(model, plan=plan)
    assert type(model.attn) is nn.MultiheadAttention
    with pytest.warns(UserWarning, match=r"without a sparse module stay dense: \['attn'\]"):
        convert_to_sparse(model, plan=plan, strict=False)
    assert type(model.attn) is nn.MultiheadAttention


def test_attention_without_plan_is_read_from_its_zeros():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(E, H, batch_first=True).eval()})
    _pruned(model, sparsity=0.5, bank=16)
    q, _ = _inputs(True)
    with torch.no_grad():
        want = model.attn(q, q, q)[0]
        convert_to_sparse(model)
        got = model.attn(q, q, q)[0]
    assert (model.attn.in_proj.bank_size, model.attn.in_proj.k) == (16, 8)
    _close(got, want)
