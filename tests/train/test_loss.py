"""PartialFCLoss: at sample rate 1 it is a plain multi-label CosFace softmax (loss and gradients), one rank
and two gloo ranks give the same loss and gradients, and bad labels are one clear error.

Run as a script (`test_loss.py OUT_DIR RANK`) this file is one rank of the two-rank test."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from onevision_encoder.train.loss import PartialFCLoss, draw_labels, reshard_centres, shard_range

NUM_CLASSES, DIM, IN_DIM = 53, 16, 12


def full_softmax_loss(embeddings, centres, labels, margin=0.3, scale=64.0, threshold=0.75):
    """The loss written out plainly, in float64: one softmax over every class per (sample, label)."""
    cos = F.normalize(embeddings.double(), dim=1) @ F.normalize(centres.double(), dim=1).T
    cos = cos.clamp(-1, 1)
    losses = []
    for n in range(labels.shape[0]):
        for y in labels[n].tolist():
            logits = torch.where(cos[n] > threshold, torch.zeros_like(cos[n]), cos[n] * scale)
            positive = (cos[n, y] - margin) * scale
            logits = torch.cat([logits[:y], positive[None], logits[y + 1:]])
            losses.append(torch.logsumexp(logits, 0) - positive)
    return torch.stack(losses).mean()


def problem(batch=6, labels_per_sample=8, seed=0):
    """Embeddings near some of their labels' centres, so that margins and the negative threshold bite."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, DIM, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (batch, labels_per_sample), generator=g)
    labels[0, 1] = labels[0, 0]  # a label drawn twice (OCR tags are padded by repetition)
    embeddings = centres[labels[:, 0]] + 0.4 * torch.randn(batch, DIM, generator=g)
    # sample 1 is near two of its labels at once; sample 2 near a class that is none of its labels
    centres[labels[1, 5]] = centres[labels[1, 2]] + 0.2 * torch.randn(DIM, generator=g)
    embeddings[1] = centres[labels[1, 2]]
    outsider = next(c for c in range(NUM_CLASSES) if c not in labels[2])
    centres[outsider] = centres[labels[2, 0]] + 0.2 * torch.randn(DIM, generator=g)
    return embeddings, centres, labels


def loss_module(centres, **kwargs):
    loss = PartialFCLoss(len(centres), centres.shape[1], **kwargs)
    with torch.no_grad():
        loss.centres.copy_(centres[slice(*loss.shard)])
    return loss


def test_sample_rate_one_gives_the_full_softmax_loss_and_gradients():
    embeddings, centres, labels = problem()
    cos = F.normalize(embeddings, dim=1) @ F.normalize(centres, dim=1).T
    assert ((cos > 0.75).sum(dim=1) >= 2).sum() >= 2  # rows with negatives over the threshold besides a positive
    loss = loss_module(centres, sample_rate=1.0)
    ours_input = embeddings.clone().requires_grad_()
    ours = loss(ours_input, labels)
    ours.backward()
    reference_input, reference_centres = embeddings.clone().requires_grad_(), centres.clone().requires_grad_()
    reference = full_softmax_loss(reference_input, reference_centres, labels)
    reference.backward()
    assert ours.dtype == torch.float32 and ours.ndim == 0
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_input.grad.double(), reference_input.grad.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss.centres.grad.double(), reference_centres.grad.double(), rtol=1e-4, atol=1e-7)


def test_the_loss_is_the_mean_over_drawn_labels_and_the_draw_uses_the_default_generator():
    embeddings, centres, labels = problem(labels_per_sample=10)
    loss = loss_module(centres, sample_rate=1.0)
    torch.manual_seed(7)
    ours = loss(embeddings, labels)
    torch.manual_seed(7)
    drawn = draw_labels(labels, 8)
    assert all(set(d.tolist()) <= set(row.tolist()) for d, row in zip(drawn, labels))
    torch.testing.assert_close(ours.double(), full_softmax_loss(embeddings, centres, drawn), rtol=1e-5, atol=1e-5)
    # 8 separate cross-entropies averaged: one label per step, drawn in turn, averages to the same
    single = loss_module(centres, sample_rate=1.0, labels_per_step=1)
    per_label = torch.stack([single(embeddings, drawn[:, [p]]) for p in range(8)])
    torch.testing.assert_close(per_label.mean(), ours, rtol=1e-5, atol=1e-5)
    draws = {tuple(draw_labels(torch.arange(10)[None], 8)[0].tolist()) for _ in range(20)}
    assert len(draws) > 10  # random subsets, not the first 8


def test_partial_fc_scores_the_positives_and_a_sample_rate_of_the_negatives():
    embeddings, centres, labels = problem()
    embeddings, labels = embeddings[:2], labels[:2]  # 15 positives, fewer than half the classes
    loss = loss_module(centres, sample_rate=0.5)
    partial = loss(embeddings, labels)
    partial.backward()
    scored = loss.centres.grad.abs().sum(dim=1) > 0
    assert scored[labels.unique()].all()  # every positive is scored
    assert scored.sum() == int(0.5 * NUM_CLASSES)
    # fewer negatives in each denominator: a smaller loss than over every class
    assert partial < full_softmax_loss(embeddings, centres, labels)


@pytest.mark.parametrize(("labels", "message"), [
    (torch.zeros(6, 7, dtype=torch.long), "at least 8 labels"),
    (torch.full((6, 8), NUM_CLASSES), f"label {NUM_CLASSES} is outside the bank's classes [0, {NUM_CLASSES})"),
    (torch.full((6, 8), -1), "label -1 is outside"),
    (torch.zeros(5, 8, dtype=torch.long), "batch 6"),
    (torch.zeros(6, 8), "integer class ids"),
])
def test_bad_labels_are_one_clear_error(labels, message):
    loss = PartialFCLoss(NUM_CLASSES, DIM)
    with pytest.raises(ValueError) as error:
        loss(torch.randn(6, DIM), labels)
    assert message in str(error.value)


def test_reshard_centres_gives_each_rank_its_contiguous_range():
    centres = torch.randn(NUM_CLASSES, DIM)
    two = [centres[slice(*shard_range(NUM_CLASSES, 2, rank))] for rank in range(2)]
    assert [len(s) for s in two] == [27, 26]
    torch.testing.assert_close(reshard_centres(two, 1, 0), centres)
    three = [reshard_centres(two, 3, rank) for rank in range(3)]
    assert [len(s) for s in three] == [18, 18, 17]
    torch.testing.assert_close(torch.cat(three), centres)


def distributed_problem():
    """Inputs of the two-rank test: a linear backbone, uneven batches (5 and 3), 10 labels a sample."""
    g = torch.Generator().manual_seed(3)
    backbone = torch.nn.Linear(IN_DIM, DIM)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(DIM, IN_DIM, generator=g))
        backbone.bias.copy_(torch.randn(DIM, generator=g))
    inputs = torch.randn(8, IN_DIM, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (8, 10), generator=g)
    centres = torch.randn(NUM_CLASSES, DIM, generator=g)
    return backbone, inputs, labels, centres, [slice(0, 5), slice(5, 8)]


def distributed_worker(out_dir: str, rank: int) -> None:
    import torch.distributed as dist

    # a file rendezvous: no port to pick, so nothing to collide with other runs on the machine
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=2)
    two_rank_step(out_dir, rank)
    # the DDP model is gone before the group: freeing its reducer after destroy_process_group could hang
    dist.barrier()
    dist.destroy_process_group()


def two_rank_step(out_dir: str, rank: int) -> None:
    from onevision_encoder.train.loss import sum_gradients_hook

    backbone, inputs, labels, centres, batches = distributed_problem()
    model = torch.nn.parallel.DistributedDataParallel(backbone)
    model.register_comm_hook(None, sum_gradients_hook)
    loss = loss_module(centres, sample_rate=1.0)
    embeddings = model(inputs[batches[rank]])
    embeddings.retain_grad()
    torch.manual_seed(100 + rank)
    value = loss(embeddings, labels[batches[rank]])
    value.backward()
    torch.manual_seed(100 + rank)
    drawn = draw_labels(labels[batches[rank]], 8)
    # Partial FC proper: each rank scores its shard's positives and its own draw of negatives
    partial = loss_module(centres, sample_rate=0.9)
    partial_value = partial(embeddings.detach(), drawn)
    partial_value.backward()
    save_file({"loss": value.detach()[None], "embeddings_grad": embeddings.grad, "centres_grad": loss.centres.grad,
               "weight_grad": model.module.weight.grad, "drawn": drawn, "partial_loss": partial_value.detach()[None],
               "partial_scored": partial.centres.grad.abs().sum(dim=1) > 0},
              os.path.join(out_dir, f"rank{rank}.safetensors"))


def test_one_rank_and_two_gloo_ranks_give_the_same_loss_and_gradients(tmp_path, run_two_ranks):
    run_two_ranks(__file__, tmp_path, timeout=240)
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in range(2)]
    assert ranks[0]["loss"] == ranks[1]["loss"]  # the same value on every rank
    backbone, inputs, labels, centres, _ = distributed_problem()
    drawn = torch.cat([r["drawn"] for r in ranks])  # each rank's own draw, from its own generator
    assert not torch.equal(drawn, labels[:, :8])
    loss = loss_module(centres, sample_rate=1.0)
    embeddings = backbone(inputs)
    embeddings.retain_grad()
    single = loss(embeddings, drawn)
    single.backward()
    torch.testing.assert_close(ranks[0]["loss"][0], single.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["embeddings_grad"] for r in ranks]), embeddings.grad,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["centres_grad"] for r in ranks]), loss.centres.grad,
                               rtol=1e-4, atol=1e-6)
    for r in ranks:  # DDP with the summing hook: the backbone gets the gradient of the global loss
        torch.testing.assert_close(r["weight_grad"], backbone.weight.grad, rtol=1e-4, atol=1e-6)
    assert ranks[0]["partial_loss"] == ranks[1]["partial_loss"] < single
    positives = drawn.unique()
    for rank, r in enumerate(ranks):
        start, stop = shard_range(NUM_CLASSES, 2, rank)
        own = positives[(positives >= start) & (positives < stop)] - start
        assert r["partial_scored"][own].all()
        assert len(own) < int(0.9 * (stop - start)) == r["partial_scored"].sum()  # positives + sampled negatives


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(200)  # where a stuck rank waits, in the test's failure message
    distributed_worker(sys.argv[1], int(sys.argv[2]))
