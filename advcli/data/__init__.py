"""The data wing: datasets as batches of pixels in [0, 1], whatever they come from.

`sets` (what a dataset is: ``DatasetInfo`` and one split as an ``ImageSet``), `builtin` (MNIST, Fashion-MNIST,
CIFAR-10/100, SVHN through torchvision, and a synthetic set for tests; the batches and their augmentation),
`folder` (a user's own images in class folders).

Imports only the shared top level (`advcli.errors`); knows nothing of attacks, models, runs, evaluation or training.
The names below are re-exported so ``from advcli import data; data.load_split(...)`` reads as it always did.
"""

from advcli.data.sets import DatasetInfo, ImageSet
from advcli.data.builtin import (DATASETS, SPLITS, dataset_info, split_order, load_split, num_batches, batches,
    share)
from advcli.errors import DataError

__all__ = ["DatasetInfo", "ImageSet", "DataError", "DATASETS", "SPLITS", "dataset_info", "split_order",
           "load_split", "num_batches", "batches", "share"]
