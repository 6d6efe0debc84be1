"""Pretraining by cluster discrimination (REFERENCE §6), in the order a run goes:

1. features of the training data from a teacher encoder (`ove encode`, `onevision_encoder.encode`);
2. a concept bank: spherical k-means of those features into K unit centres (`kmeans.py`, `ove concepts
   build`), and each sample's top-k nearest concepts as its labels (`concepts.py`, `ove concepts assign`);
3. the loss: a multi-label CosFace softmax over the concept centres, sharded over ranks with Partial FC
   (`loss.py`), one head per dataset;
4. `ove train`: the training loop, data, checkpoints that resume exactly.
"""

from .concepts import assign_concepts, build_bank, load_bank, read_features, read_labels, save_bank, write_labels
from .kmeans import spherical_kmeans
from .loss import PartialFCLoss, reshard_centres, sum_gradients_hook

__all__ = [
    "PartialFCLoss",
    "assign_concepts",
    "build_bank",
    "load_bank",
    "read_features",
    "read_labels",
    "reshard_centres",
    "save_bank",
    "spherical_kmeans",
    "sum_gradients_hook",
    "write_labels",
]
