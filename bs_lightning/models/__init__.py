"""LightningModules of the recipes.

Every model names the metric its test reports (`test_metric`, e.g. "test/ppl") and whether
higher is better (`higher_is_better`), and takes its data-dependent sizes as keyword
arguments (`vocab_size`, or `num_classes` and `input_shape`) from the data module's
`model_kwargs()`.
"""

from bs_lightning.models.cnn import VGGClassifier
from bs_lightning.models.lstm_lm import LSTMLanguageModel
from bs_lightning.models.mlp import MLPClassifier
from bs_lightning.models.transformer_lm import TransformerLanguageModel

__all__ = ["LSTMLanguageModel", "MLPClassifier", "TransformerLanguageModel", "VGGClassifier"]
