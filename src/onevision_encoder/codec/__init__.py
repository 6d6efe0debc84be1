"""Codec-style patch selection: keep the patches of a video where something moves or changes.

The flow, one module per step:

    file --video.py--> decoded frames, in presentation order, in one streaming pass
         --scan.py---> the sampled frames (held as decoded, or on the model's square) + per-frame maps on a
                       working grid (cells.py: the grid; workers.py: holding or resizing, and luma, in threads
                       beside the decoder; motion.py: bitstream motion vectors, camera motion;
                       block_matching.py: motion where the codec exports no vectors; reference.py: the
                       published reader's maps)
         --scores.py-> one score per patch, under a policy ("balanced" or "reference")
         --selection.py: choose_patches -> kept patches (whole_frames whole, then a global top-K);
                       select_patches packs them -> CodecClip, the patch list, their pictures painted from
                       the held frames (patch_pictures.py)

`quality.py` measures what a selection keeps (replenishment PSNR), `contact_sheet.py` draws it, `cli.py` is
`ove select`.
"""

from ..processing import collate_patch_lists
from .block_matching import block_motion
from .motion import camera_free_motion, motion_cells
from .quality import replenish, replenishment_psnr
from .scan import VideoScan, scan_video
from .scores import DEFAULT_POLICY, POLICIES, patch_scores
from .selection import (
    CodecClip,
    check_whole_frames,
    choose_patches,
    sample_frames,
    save_selection,
    select_patches,
    uniform_frames_mask,
)
from .video import VideoDecodeError

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "CodecClip",
    "VideoDecodeError",
    "VideoScan",
    "block_motion",
    "camera_free_motion",
    "check_whole_frames",
    "choose_patches",
    "collate_patch_lists",
    "motion_cells",
    "patch_scores",
    "replenish",
    "replenishment_psnr",
    "sample_frames",
    "save_selection",
    "scan_video",
    "select_patches",
    "uniform_frames_mask",
]
