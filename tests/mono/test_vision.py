import pytest
import torch
import torch.nn.functional as F

from mono.configuration import PatchEmbedConfig
from mono.vision import PatchEmbeddings, pixel_shuffle


def _labelled_grid(h=4, w=6, c=3):
    # value encodes (row, col, channel) so every output slot can be checked by decoding it
    y, x, ch = torch.meshgrid(torch.arange(h), torch.arange(w), torch.arange(c), indexing="ij")
    return (y * 1000 + x * 10 + ch).float()[None]


def test_pixel_shuffle_v2_order_on_labelled_grid():
    x = _labelled_grid()
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (1, 2, 3, 12)
    for i in range(2):
        for j in range(3):
            expect = torch.cat([x[0, 2 * i, 2 * j], x[0, 2 * i, 2 * j + 1], x[0, 2 * i + 1, 2 * j], x[0, 2 * i + 1, 2 * j + 1]])
            assert torch.equal(out[0, i, j], expect)


def test_pixel_shuffle_v1_is_transposed_v2():
    x = _labelled_grid(4, 4)
    assert torch.equal(pixel_shuffle(x, 0.5, "v1"), pixel_shuffle(x, 0.5, "v2").transpose(1, 2))


def test_pixel_shuffle_rejects_odd_grid():
    with pytest.raises(ValueError, match="divisible"):
        pixel_shuffle(torch.zeros(1, 3, 4, 2), 0.5)


def _embeddings():
    torch.manual_seed(0)
    return PatchEmbeddings(PatchEmbedConfig(hidden_size=8, image_size=56, patch_size=14))


def test_patch_embedding_drops_class_slot_and_adds_positions():
    emb = _embeddings()
    px = torch.randn(2, 3, 56, 56)
    out = emb(px)
    conv = F.conv2d(px, emb.patch_embedding.weight, emb.patch_embedding.bias, stride=14).flatten(2).transpose(1, 2)
    assert out.shape == (2, 16, 8)
    torch.testing.assert_close(out, conv + emb.position_embedding[:, 1:], rtol=0, atol=1e-6)
    assert "class_embedding" in dict(emb.named_parameters())


def test_position_embedding_resized_bicubic_in_fp32_for_other_tiles():
    emb = _embeddings().to(torch.bfloat16)
    px = torch.randn(1, 3, 84, 84, dtype=torch.bfloat16)  # 6x6 patch grid, learned on 4x4
    out = emb(px)
    grid = emb.position_embedding[:, 1:].float().reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    pos = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    conv = emb.patch_embedding(px).flatten(2).transpose(1, 2)
    expect = conv + pos.to(torch.bfloat16)
    assert out.shape == (1, 36, 8)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
