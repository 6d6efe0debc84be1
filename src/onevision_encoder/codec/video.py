"""Streaming video decoding with PyAV: frame counting, uniform frame sampling, motion vectors, one error type.

Every decoded frame is numbered 0, 1, 2, ... in presentation order (the order the decoder returns them);
`frame_ids` everywhere in the package use this numbering.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import av
import numpy as np
from av.sidedata.sidedata import SideDataContainer
from av.sidedata.sidedata import Type as SideDataType

# Measured with av 18 on 2 cores (H.264 720p, motion-vector export on): frame threading made decoding 2-4x
# slower and once dropped a frame's motion vectors; slice threading costs nothing and keeps them all.
DECODE_THREADING = "SLICE"


class VideoDecodeError(RuntimeError):
    """A video file could not be read: missing, empty, not a video, or undecodable. Names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _open(path: str | os.PathLike):
    """Open `path` and return (container, its first video stream), or raise VideoDecodeError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "no such file")
    if os.path.isdir(path):
        raise VideoDecodeError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoDecodeError(path, f"not a readable video container ({exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "contains no video stream")
    return container, container.streams.video[0]


# Decoders that attach motion vectors with flags2=+export_mvs (FFmpeg's mpegvideo family and H.264).
MOTION_VECTOR_CODECS = frozenset(
    {"h264", "mpeg4", "mpeg1video", "mpeg2video", "h263", "h263p", "msmpeg4v2", "msmpeg4v3", "flv1", "wmv1", "wmv2"}
)


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream. presentation_numbers: {pts: frame number} of
    its packets, when they were read (`VideoFile.info(timestamps=True)`) and are usable (all present, all
    different); None otherwise."""

    frame_count: int
    codec: str
    width: int
    height: int
    presentation_numbers: dict[int, int] | None = field(default=None, repr=False, compare=False)

    @property
    def exports_motion_vectors(self) -> bool:
        return self.codec in MOTION_VECTOR_CODECS


class VideoFile:
    """An opened video file: what its first video stream is (`info`), and one streaming decoding pass over it
    (`frames`). Probing and decoding share one opening because opening is not free: FFmpeg decodes up to 20
    H.264 frames to learn the stream's reordering delay (9 ms at 640x360, 66 ms at 1080p, measured)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.container, self.stream = _open(self.path)
        self._first_packet = None  # (pts, pos) of the first packet, when a demuxing pass has read ahead

    def __enter__(self) -> "VideoFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def info(self, timestamps: bool = False) -> VideoInfo:
        """Frame count, codec and size. The frame count is the container's when it has one (MP4/MOV store it
        in their index) and timestamps are not asked for; otherwise (Matroska, WebM, raw streams) the video
        packets are counted by demuxing without decoding, which costs little next to decoding, leaving out
        those the decoder will not show (cut off by an MP4 edit list). timestamps: also number the packets by
        presentation time (`VideoInfo.presentation_numbers`). Raises VideoDecodeError if there are no frames."""
        count, numbers = self.stream.frames, None
        if count <= 0 or timestamps:
            packets, readable = [], True
            try:
                packets = [(p.pts, p.pos, p.is_discard) for p in self.container.demux(self.stream) if p.size > 0]
            except av.error.FFmpegError as exc:
                if count <= 0:
                    raise VideoDecodeError(self.path, f"cannot read packets ({exc})") from None
                readable = False  # unreadable past some point: keep the container's count, number by decoding
            self._first_packet = packets[0][:2] if packets else (None, None)  # where `frames` must start again
            if readable:
                # Packets flagged "discard" (before the start of an MP4 edit list: a clip cut without
                # re-encoding) are decoded but never shown: no count, no number, as when counting decoded frames.
                pts = [p for p, _, discard in packets if not discard]
                count = len(pts)
                if timestamps and None not in pts and len(set(pts)) == len(pts):
                    numbers = {timestamp: number for number, timestamp in enumerate(sorted(pts))}
        if count <= 0:
            raise VideoDecodeError(self.path, "video stream has no frames")
        context = self.stream.codec_context
        return VideoInfo(count, context.name, context.width, context.height, numbers)

    def frames(
        self,
        export_motion_vectors: bool = False,
        needed: Callable[[int], bool] | None = None,
        numbering: dict[int, int] | None = None,
    ) -> Iterator[tuple[int, av.VideoFrame]]:
        """Yield `(number, frame)` for the decoded frames, in presentation order; `number` counts frames
        from 0 in that order. See `decode_frames`; numbering: `info(timestamps=True).presentation_numbers`,
        which makes `needed` skip frames (without it every frame is decoded and counted)."""
        self._rewind()
        context = self.stream.codec_context
        if export_motion_vectors:
            context.options = {"flags2": "+export_mvs"}
        self.stream.thread_type = DECODE_THREADING
        produced, skipping = 0, False
        try:
            for packet in self.container.demux(self.stream):
                if numbering is not None and needed is not None and packet.pts is not None:
                    number = numbering.get(packet.pts)
                    if skipping != (number is not None and not needed(number)):
                        skipping = not skipping  # set only on change: the setter costs as much as a small decode
                        context.skip_frame = "NONREF" if skipping else "DEFAULT"
                for frame in packet.decode():  # the final empty packet flushes the decoder's delayed frames
                    number = produced if numbering is None else numbering.get(frame.pts)
                    if number is None:
                        raise VideoDecodeError(self.path, f"decoded a frame with an unknown timestamp {frame.pts}")
                    produced += 1
                    yield number, frame
        except av.error.FFmpegError as exc:
            if produced == 0:
                raise VideoDecodeError(self.path, f"cannot decode video ({exc})") from None
        if produced == 0:
            raise VideoDecodeError(self.path, "no frame could be decoded")

    def _rewind(self) -> None:
        """Back to the first packet after a demuxing pass: seek to the start, and if the container lands
        anywhere else (some formats seek only roughly), open the file again."""
        if self._first_packet is None:
            return
        first, self._first_packet = self._first_packet, None
        try:
            self.container.seek(0, backward=True, stream=self.stream)
            packet = next(p for p in self.container.demux(self.stream) if p.size > 0)
            self.container.seek(0, backward=True, stream=self.stream)
            if (packet.pts, packet.pos) == first:
                return
        except (av.error.FFmpegError, StopIteration):
            pass
        self.close()
        self.container, self.stream = _open(self.path)


def probe_video(path: str | os.PathLike, timestamps: bool = False) -> VideoInfo:
    """`VideoFile(path).info(timestamps)`: frame count, codec and size of the first video stream."""
    with VideoFile(path) as video:
        return video.info(timestamps)


def sample_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """Frame numbers `linspace(0, total-1, num_frames)` truncated to integers, as published.

    With fewer frames than asked for, numbers repeat (each slot still gets a frame; repeats carry no motion).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    return np.linspace(0, total_frames - 1, num_frames).astype(np.int64)


def decode_frames(
    path: str | os.PathLike, export_motion_vectors: bool = False, needed: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield `(number, frame)` for the decoded frames of the first video stream, in presentation order, in
    one streaming pass; `number` counts frames from 0 in that order.

    export_motion_vectors: ask the decoder to attach motion vectors (H.264, MPEG-2/4, H.263 export them;
    HEVC, VP9 and AV1 decoders do not).
    needed: says, by frame number, which frames the caller wants. The others are not decoded when no other
    frame is predicted from them (non-reference frames: most B-frames), which saves their decoding time, and
    do not appear in the output; reference frames still come out. Numbers then come from the packets'
    presentation timestamps, read by a demuxing pass that costs little next to decoding; a stream whose
    timestamps are missing or repeated is decoded whole and counted instead.
    Decoder errors become VideoDecodeError; a stream that breaks off part-way (truncated file) just ends
    early, as FFmpeg conceals what it can.
    """
    with VideoFile(path) as video:
        numbering = video.info(timestamps=True).presentation_numbers if needed is not None else None
        yield from video.frames(export_motion_vectors, needed, numbering)


def motion_vectors(frame: av.VideoFrame, moving_l0: bool = False) -> np.ndarray | None:
    """The frame's motion vectors as FFmpeg's structured array (source, w, h, src_x, src_y, dst_x, dst_y,
    flags, motion_x, motion_y, motion_scale), or None when it has none (intra frames, codecs without export).
    moving_l0: only the past-referencing (list 0) blocks that move, all that camera-free motion reads.

    A copy, read through a side-data container of its own: `frame.side_data` is cached on the frame and
    points back to it, and PyAV's array is a view into the frame. Either keeps the frame, decoded picture
    and all, alive after its last use, the first until the cyclic garbage collector runs."""
    side = SideDataContainer(frame).get(SideDataType.MOTION_VECTORS)
    if side is None:
        return None
    view = _vector_records(side)
    # copied as opaque records: NumPy copies a structured array with padding field by field, 15x slower
    records = view.view(f"V{view.dtype.itemsize}")
    if moving_l0:  # where the camera stands still, most blocks do too: a tenth of them copied
        return records[(view["source"] < 0) & ((view["motion_x"] | view["motion_y"]) != 0)].view(view.dtype)
    return records.copy().view(view.dtype)


_VECTOR_LAYOUT: list[np.dtype] = []  # PyAV's structured dtype of FFmpeg's AVMotionVector, learnt once


def _vector_records(side) -> np.ndarray:
    """A side data's motion vectors as a structured view: PyAV's own layout (from its `to_ndarray`, the first
    time), then `np.frombuffer` on the side data, which skips `to_ndarray`'s building of that layout on each call
    (a third of the time spent on the vectors of a 720p frame, measured)."""
    if not _VECTOR_LAYOUT:
        _VECTOR_LAYOUT.append(side.to_ndarray().dtype)
    return np.frombuffer(side, _VECTOR_LAYOUT[0])


def quarter_turns(frame: av.VideoFrame) -> int:
    """How many times to turn the decoded picture counter-clockwise (np.rot90) to display it upright,
    from the display-matrix rotation (0 when there is none)."""
    return int(round((frame.rotation or 0) / 90.0)) % 4
