"""Test helpers shared by several test files, imported as `helpers` (pytest puts tests/ on
`sys.path`, as for `conftest`).

- Here: the tiny randomly initialised Hugging Face models the tests build (no download),
  each seeded with 0 and in eval mode: `tiny_bert` (any BERT class), `tiny_gpt2`, `tiny_llama`.
- `helpers.hf_fakes`: a tiny BERT folder with its tokenizer, and SST-2 files.
- `helpers.fake_datasets`: PTB and Fashion-MNIST stand-ins in their real file formats.
- `helpers.kernels`: balanced cases and the accuracy rule of the CPU kernel tests.
- `helpers.op_calls`: `OpCalls`, a count of one operator's calls (a dispatch mode).
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

HIDDEN = 32  # features of every tiny model; each has 2 blocks of 4 attention heads


def tiny_model(model_class: type[PreTrainedModel], config: PretrainedConfig) -> PreTrainedModel:
    """`model_class(config)` initialised from seed 0, in eval mode."""
    torch.manual_seed(0)
    return model_class(config).eval()


def tiny_bert(
    model_class: type[PreTrainedModel] = BertModel,
    vocab_size: int = 96,
    hidden: int = HIDDEN,
    intermediate: int = 64,
    max_positions: int = 32,
    **config,
) -> PreTrainedModel:
    """A 2-layer BERT: `BertModel` or another BERT class, e.g. `BertForSequenceClassification`
    (`config` adds to the `BertConfig`, e.g. `num_labels=3`)."""
    sizes = {"hidden_size": hidden, "intermediate_size": intermediate}
    blocks = {"num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = BertConfig(
        vocab_size=vocab_size, max_position_embeddings=max_positions, **sizes, **blocks, **config
    )
    return tiny_model(model_class, cfg)


def tiny_gpt2(vocab_size: int = 96, positions: int = 32, **config) -> GPT2LMHeadModel:
    """A 2-layer `GPT2LMHeadModel` (`config` adds to the `GPT2Config`, e.g. `bos_token_id=0`)."""
    blocks = {"n_embd": HIDDEN, "n_layer": 2, "n_head": 4}
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=positions, **blocks, **config)
    return tiny_model(GPT2LMHeadModel, cfg)


def tiny_llama(vocab_size: int = 96, positions: int = 32) -> LlamaForCausalLM:
    """A 2-layer `LlamaForCausalLM` with grouped-query attention (2 key/value heads)."""
    sizes = {"hidden_size": HIDDEN, "intermediate_size": 64, "max_position_embeddings": positions}
    heads = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    return tiny_model(LlamaForCausalLM, LlamaConfig(vocab_size=vocab_size, **sizes, **heads))
