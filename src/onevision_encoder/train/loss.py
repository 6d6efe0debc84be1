"""The multi-label cluster-discrimination loss with Partial FC (REFERENCE §6).

Every sample carries L concept labels (its nearest centres of a concept bank, in order). Each step draws
`labels_per_step` (8) of them per sample; each drawn label is its own softmax cross-entropy over the class
centres, and the loss is the mean of those cross-entropies, so its gradient is the gradient of that mean.
(The published backward leaves out the 1/8 of the mean: its gradients are 8x too large.)

One softmax, for a sample with L2-normalised embedding e and drawn label y, over L2-normalised centres w_j:

    logit_y = scale * (cos(e, w_y) - margin)           CosFace margin on the positive
    logit_j = scale * cos(e, w_j)     if cos(e, w_j) <= negative_threshold
    logit_j = 0                       otherwise (as published: such a negative stays in the denominator)
    CE      = logsumexp(logits) - logit_y

Partial FC: the centres are split into contiguous shards, one per rank of the process group. Every rank
all-gathers the batch's embeddings and drawn labels, then scores them against its own shard only: all the
shard's classes that are positives somewhere in the global batch, plus uniformly drawn negatives up to
`sample_rate` of the shard. The softmax's max and sum are all-reduced, so every rank returns the same loss,
the mean over the whole global batch. Logits are computed in float32 (autocast off inside the loss).

Gradients: `embeddings.grad` and `centres.grad` are exactly those of the returned loss (the all-gather
sends each rank the gradient of its own embeddings summed over every rank's shard), so one rank with batch
2B and two ranks with batch B each give the same loss and the same gradients. DistributedDataParallel
*averages* the backbone's gradients over ranks, which would hand the backbone 1/world_size of that
gradient: register `sum_gradients_hook` on the DDP model (`model.register_comm_hook(None,
sum_gradients_hook)`) so that it sums instead. Never wrap this module itself in DDP: its centres are a
shard per rank, not a replica.

Randomness comes from torch's default generators on each rank (the label draw on the labels' device, the
negatives on the centres'), so saving and restoring the RNG states resumes exactly. The label draw of
each rank's own samples happens before the all-gather, so every rank sees the same drawn labels.

Memory: the logits are held once per sample, `[global batch, scored classes]`, not once per drawn label
(the 8 softmaxes of a sample share them and differ only in their positive column), a few such tensors
in all; the centres' gradient is dense, as the optimiser needs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous class range (start, stop) of `rank`: the first `num_classes % world_size` ranks take one more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def reshard_centres(shards: list[Tensor], world_size: int, rank: int) -> Tensor:
    """The centre shard of `rank` among `world_size` ranks, from the shards of a run on another number of
    ranks (`shards` in rank order, together all the classes)."""
    centres = torch.cat(list(shards))
    start, stop = shard_range(len(centres), world_size, rank)
    return centres[start:stop].clone()


def draw_labels(labels: Tensor, k: int) -> Tensor:
    """k of each row's labels, drawn uniformly without replacement (all of them, in order, when k == L)."""
    if labels.shape[1] == k:
        return labels
    order = torch.rand(labels.shape, device=labels.device).argsort(dim=1)[:, :k]
    return labels.gather(1, order)


def sum_gradients_hook(process_group, bucket):
    """A DDP communication hook that sums gradients over ranks instead of averaging them (see above)."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class _GatherWithGradient(torch.autograd.Function):
    """All-gather of every rank's rows (any number per rank); backward: each rank gets the gradient of its
    own rows summed over every rank's use of them."""

    @staticmethod
    def forward(ctx, rows: Tensor, group, sizes: list[int], rank: int) -> Tensor:
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        return _gather_rows(rows, group, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward passes the gradient through unchanged: every rank computes the same
    loss from the sum, so each rank's share of the gradient is the gradient of its own term."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _gather_rows(rows: Tensor, group, sizes: list[int]) -> Tensor:
    """Rows of every rank, in rank order; all_gather needs equal shapes, so pad to the largest."""
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class PartialFCLoss(nn.Module):
    """Multi-label CosFace softmax over `num_classes` centres sharded over the ranks of `process_group`
    (the default group when torch.distributed is initialised, else a single process).

    `self.centres`: this rank's shard, an `nn.Parameter [shard_size, embedding_dim]` float32, init
    N(0, 0.01); `self.shard`: its class range (start, stop). forward(embeddings `[B, D]` of this rank's
    batch, labels `[B, L]` int64 global class ids, L >= labels_per_step) -> the scalar loss, the same on
    every rank. Every rank must call forward the same number of times (it runs collectives); batch sizes
    may differ between ranks.
    """

    def __init__(self, num_classes: int, embedding_dim: int, sample_rate: float = 0.1, margin: float = 0.3,
                 scale: float = 64.0, negative_threshold: float = 0.75, labels_per_step: int = 8,
                 process_group=None):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if labels_per_step < 1:
            raise ValueError(f"labels_per_step must be at least 1, got {labels_per_step}")
        self.process_group = process_group
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        if num_classes < self.world_size:
            raise ValueError(f"num_classes ({num_classes}) is smaller than the number of ranks ({self.world_size})")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.sample_rate, self.margin, self.scale = sample_rate, margin, scale
        self.negative_threshold, self.labels_per_step = negative_threshold, labels_per_step
        self.shard = shard_range(num_classes, self.world_size, self.rank)
        shard_size = self.shard[1] - self.shard[0]
        self.num_sampled = max(1, int(sample_rate * shard_size))
        self.centres = nn.Parameter(torch.empty(shard_size, embedding_dim).normal_(0.0, 0.01))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, shard={self.shard}, embedding_dim={self.embedding_dim}, "
                f"sample_rate={self.sample_rate}, margin={self.margin}, scale={self.scale}, "
                f"negative_threshold={self.negative_threshold}, labels_per_step={self.labels_per_step}")

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self._check(embeddings, labels)
        drawn = draw_labels(labels, self.labels_per_step).to(embeddings.device)
        embeddings, drawn = self._gather(embeddings.float(), drawn)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self._loss(F.normalize(embeddings, dim=1), drawn)

    def _check(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must be [batch, {self.embedding_dim}], got {list(embeddings.shape)}")
        if labels.ndim != 2 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must be [batch, labels per sample] with batch {embeddings.shape[0]} like "
                             f"the embeddings, got {list(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
        if labels.shape[1] < self.labels_per_step:
            raise ValueError(f"each sample needs at least {self.labels_per_step} labels (labels_per_step), got "
                             f"{labels.shape[1]}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(f"label {bad} is outside the bank's classes [0, {self.num_classes})")

    def _gather(self, embeddings: Tensor, drawn: Tensor) -> tuple[Tensor, Tensor]:
        if self.world_size == 1:
            return embeddings, drawn
        size = torch.tensor([len(embeddings)], device=embeddings.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.process_group)
        sizes = [int(s) for s in sizes]
        gathered = _GatherWithGradient.apply(embeddings, self.process_group, sizes, self.rank)
        return gathered, _gather_rows(drawn.long(), self.process_group, sizes)

    def _sample_classes(self, local: Tensor) -> Tensor:
        """Sorted shard-local indices scored this step: every positive of the shard, then uniform negatives
        up to `num_sampled`."""
        shard_size = len(self.centres)
        if self.num_sampled >= shard_size:
            return torch.arange(shard_size, device=local.device)
        positives = torch.unique(local[local >= 0])
        if len(positives) >= self.num_sampled:
            return positives
        priority = torch.rand(shard_size, device=local.device)
        priority[positives] = 2.0  # rand is below 1: positives come first
        return priority.topk(self.num_sampled).indices.sort().values

    def _loss(self, embeddings: Tensor, drawn: Tensor) -> Tensor:
        start, stop = self.shard
        owned = (drawn >= start) & (drawn < stop)  # [N, P]: this rank holds the label's centre
        local = torch.where(owned, drawn - start, -1)
        sampled = self._sample_classes(local)
        column = torch.searchsorted(sampled, local.clamp(min=0))  # owned labels' column among the sampled
        column = torch.where(owned, column, -1)

        scored = self.centres if len(sampled) == len(self.centres) else self.centres[sampled]
        centres = F.normalize(scored.float(), dim=1)
        cos = (embeddings @ centres.T).clamp(-1.0, 1.0)  # [N, S]
        negative = torch.where(cos > self.negative_threshold, torch.zeros_like(cos), cos * self.scale)
        positive = (cos.gather(1, column.clamp(min=0)) - self.margin) * self.scale  # [N, P], valid where owned

        # A shift per sample shared by its P softmaxes (any shift is exact; this one is within scale*margin
        # of every row's own max, so nothing over- or underflows).
        positive = positive.masked_fill(~owned, -torch.inf)  # exp gives 0 there, with a zero gradient
        shift = torch.maximum(negative.detach().amax(dim=1), positive.detach().amax(dim=1))
        shift = self._all_reduce(shift, dist.ReduceOp.MAX)
        exp_negative = torch.exp(negative - shift[:, None])
        exp_positive = torch.exp(positive - shift[:, None])

        # Row (n, p) sums every sampled column as a negative except its own positive column, plus the positive.
        # Summed without subtracting (a subtraction cancels when the positive's negative term dominates): the
        # columns of no drawn label of the sample, then the sample's other owned label columns once each.
        is_label_column = torch.zeros_like(cos, dtype=torch.bool)
        rows = torch.arange(len(cos), device=cos.device)[:, None].expand_as(column)
        is_label_column[rows[owned], column[owned]] = True
        other_columns = exp_negative.masked_fill(is_label_column, 0.0).sum(dim=1)  # [N]
        label_terms = exp_negative.gather(1, column.clamp(min=0)) * owned  # [N, P]
        first = _first_occurrence(column) & owned  # count a column drawn twice once
        different = column[:, :, None] != column[:, None, :]  # [N, P(row), P(other label)]
        label_columns = (label_terms * first)[:, None, :].mul(different).sum(dim=2)  # [N, P]
        denominator = other_columns[:, None] + label_columns + exp_positive
        positive_logit = torch.where(owned, positive - shift[:, None], torch.zeros_like(positive))
        reduced = self._sum_over_ranks(torch.stack([denominator, positive_logit]))
        cross_entropy = reduced[0].log() - reduced[1]  # logsumexp - logit_y, both shifted by the same amount
        return cross_entropy.mean()

    def _all_reduce(self, x: Tensor, op) -> Tensor:
        if self.world_size > 1:
            x = x.contiguous()
            dist.all_reduce(x, op=op, group=self.process_group)
        return x

    def _sum_over_ranks(self, x: Tensor) -> Tensor:
        return _SumOverRanks.apply(x, self.process_group) if self.world_size > 1 else x


def _first_occurrence(column: Tensor) -> Tensor:
    """[N, P] bool: True where column[n, p] does not appear in column[n, :p]."""
    earlier = torch.ones(column.shape[1], column.shape[1], dtype=torch.bool, device=column.device).tril(-1)
    same = column[:, :, None] == column[:, None, :]  # [N, p, q]
    return ~(same & earlier).any(dim=2)
