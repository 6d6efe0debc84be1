"""`ove encode`: features for whole datasets, resumable, on one process or many ranks.

The flow: `inputs.py` finds the inputs (files, folders, CSV/JSONL lists) and turns each one into a patch list
in a loader worker (codec selection or uniform frames for videos, the image preprocessing for images);
`encoder.py` batches them through the model and cuts the work into chunks that are resumed and shared out
between ranks; `features.py` writes each chunk as a safetensors shard plus the index, and reads them back.
"""

from .encoder import DEFAULT_MODEL, DTYPES, Encoder
from .features import Features, load_features
from .inputs import discover_inputs

__all__ = ["DEFAULT_MODEL", "DTYPES", "Encoder", "Features", "discover_inputs", "load_features"]
