"""Lightning data modules for the recipes: PTB (language modelling), Fashion-MNIST and
scikit-learn digits (image classification).

Every data module has `model_kwargs()`: the sizes a model needs from the data (`vocab_size`
for language models, `num_classes` and `input_shape` for classifiers), read after `setup()`.
"""

from bs_lightning.data.digits import DigitsDataModule
from bs_lightning.data.fashion_mnist import FashionMNISTDataModule
from bs_lightning.data.ptb import PTBDataModule

__all__ = ["DigitsDataModule", "FashionMNISTDataModule", "PTBDataModule"]
