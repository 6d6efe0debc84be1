"""The published head: its structure and initialisation, the temporal embedding formula, and padding."""

import math

import torch

from onevision_encoder.probe.head import AttentiveProbe, temporal_embedding


def test_structure_follows_the_published_recipe():
    torch.manual_seed(0)
    head = AttentiveProbe(256, 10)
    assert head.attention.num_heads == 4  # D / 64
    assert isinstance(head.norm, torch.nn.RMSNorm) and head.norm.eps == 1e-6
    assert head.mlp[0].out_features == 1024 and isinstance(head.mlp[1], torch.nn.GELU)
    assert head.mlp[1].approximate == "none"
    assert 0.9 < head.query.std() < 1.1  # the query starts at std 1
    assert 0.015 < head.mlp[0].weight.std() < 0.025 and head.mlp[0].bias.abs().max() == 0
    assert 0.015e-3 < head.classifier.weight.std() < 0.025e-3  # trunc-normal(0.02) x 1e-3


def test_temporal_embedding_is_interleaved_sin_cos():
    dim, t = 8, 3
    emb = temporal_embedding(torch.tensor([t]), dim)[0]
    for i in range(dim // 2):
        angle = t * 10000 ** (-2 * i / dim)
        assert math.isclose(emb[2 * i], math.sin(angle), abs_tol=1e-6)
        assert math.isclose(emb[2 * i + 1], math.cos(angle), abs_tol=1e-6)
    assert torch.equal(temporal_embedding(torch.tensor([0]), dim)[0, 1::2], torch.ones(dim // 2))


def test_padding_does_not_change_logits_and_time_matters_only_when_temporal():
    torch.manual_seed(0)
    for temporal in (False, True):
        head = AttentiveProbe(64, 5, temporal=temporal).eval()
        with torch.no_grad():
            head.classifier.weight.normal_()  # make differences visible
        tokens, times = torch.randn(1, 6, 64), torch.arange(6)[None]
        alone = head(tokens, times, torch.ones(1, 6, dtype=torch.bool))
        padded = head(torch.cat([tokens, torch.randn(1, 3, 64)], 1), torch.cat([times, times[:, :3]], 1),
                      torch.tensor([[True] * 6 + [False] * 3]))
        torch.testing.assert_close(alone, padded)
        shifted = head(tokens, times + 5, torch.ones(1, 6, dtype=torch.bool))
        assert torch.allclose(alone, shifted) != temporal


def test_standardisation_divides_out_token_statistics():
    torch.manual_seed(0)
    mean, std = torch.randn(64) * 50, torch.rand(64) * 100 + 1
    plain = AttentiveProbe(64, 3).eval()
    standard = AttentiveProbe(64, 3, token_mean=mean, token_std=std).eval()
    standard.load_state_dict({**plain.state_dict(), "token_mean": mean, "token_std": std})
    x, times, mask = torch.randn(2, 4, 64), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(standard(x * std + mean, times, mask), plain(x, times, mask))


def test_single_query_attention_equals_multihead_attention():
    torch.manual_seed(0)
    head = AttentiveProbe(256, 3).eval()
    with torch.no_grad():
        head.attention.in_proj_bias.normal_()  # biases matter too
    x = torch.randn(3, 7, 256)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] + [False] * 6])
    expected, _ = head.attention(head.query.expand(3, -1, -1), x, x, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(head.attend(x, mask), expected[:, 0], atol=1e-5, rtol=1e-4)
