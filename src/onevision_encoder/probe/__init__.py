"""`ove probe`: attentive-probe evaluation of any video encoder (REFERENCE §5), with honest numbers.

`lists.py` reads the TRAIN/VAL lists and labels; `clips.py` samples clips (TSN frames or codec selection);
`tokens.py` gives the head the frozen encoder's tokens (from the `ove encode` cache or live); `head.py` is
the published head; `run.py` trains and evaluates (DDP under torchrun); `report.py` writes the run folder.
"""

from .head import AttentiveProbe, temporal_embedding
from .lists import ListError, label_classes, read_list
from .report import metrics
from .run import ProbeError, ProbeSettings, run_probe

__all__ = ["AttentiveProbe", "ListError", "ProbeError", "ProbeSettings", "label_classes", "metrics", "read_list",
           "run_probe", "temporal_embedding"]
