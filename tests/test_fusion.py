"""Spatial-MLLM's connector on hand-built tensors: the gather's token order and shapes against
`preprocess_spatial_embeds` (its view/permute sequence reproduced in numpy on its own layout), and
`MLPAddConnector`'s forward (RMSNorm over the gathered vector, Linear -> GELU -> Linear, added)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geovr.student.fusion import SpatialConnector, connector_flops, gather_spatial_tokens


def coordinate_features(frames: int, height: int, width: int) -> torch.Tensor:
    """(S, h, w, 3): each patch's channels are its (frame, row, column)."""
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t, y, x], dim=-1).float()


def test_gather_order_on_coordinates() -> None:
    """S = 2, 4x4 grid, D = 3: one temporal token, four merged tokens in raster order; inside each
    the 2x2 window position is slowest, then the channel, then the frame (pairs (frame 0, frame 1))."""
    out = gather_spatial_tokens(coordinate_features(2, 4, 4), grid_t=1)
    assert out.shape == (4, 2 * 2 * 3 * 2)
    expected = {
        0: "0,1,0,0,0,0 | 0,1,0,0,1,1 | 0,1,1,1,0,0 | 0,1,1,1,1,1",
        1: "0,1,0,0,2,2 | 0,1,0,0,3,3 | 0,1,1,1,2,2 | 0,1,1,1,3,3",
        3: "0,1,2,2,2,2 | 0,1,2,2,3,3 | 0,1,3,3,2,2 | 0,1,3,3,3,3",
    }
    for token, text in expected.items():
        values = [float(v) for v in text.replace("|", ",").split(",")]
        assert out[token].tolist() == values, token


def spatial_mllm_gather(
    tokens: np.ndarray, height: int, width: int, tau: int = 2, merge: int = 2
) -> np.ndarray:
    """Spatial-MLLM's `preprocess_spatial_embeds` on its own layout (S, P, DD) (special tokens already
    dropped), its view/permute/reshape sequence step by step in numpy."""
    frames, _, dim = tokens.shape
    x = tokens.reshape(1, frames, height, width, dim).transpose(0, 1, 4, 2, 3)  # [B, S, DD, h, w]
    x = x.reshape(1, frames // tau, tau, dim, height // merge, merge, width // merge, merge)
    x = x.transpose(0, 1, 4, 6, 5, 7, 3, 2)
    x = x.reshape(frames // tau * height * width, dim * tau)
    return x.reshape(-1, dim * tau * merge * merge)


@pytest.mark.parametrize("frames", [2, 4, 8])
def test_gather_equals_spatial_mllm_sequence(frames: int) -> None:
    """Unique values (1000 t + 100 y + 10 x + d), so that any swap of axes shows; several temporal
    tokens (rows 0..N/T-1 belong to frames 0-1, the next to frames 2-3, ...)."""
    height, width, dim = 4, 6, 5
    t, y, x, d = np.meshgrid(
        np.arange(frames), np.arange(height), np.arange(width), np.arange(dim), indexing="ij"
    )
    values = (1000 * t + 100 * y + 10 * x + d).astype(np.float64)
    ours = gather_spatial_tokens(torch.from_numpy(values), grid_t=frames // 2).numpy()
    theirs = spatial_mllm_gather(values.reshape(frames, height * width, dim), height, width)
    assert ours.shape == theirs.shape == (frames // 2 * 2 * 3, 4 * dim * 2)
    np.testing.assert_array_equal(ours, theirs)
    if frames == 4:  # the second temporal token gathers frames 2 and 3
        assert set((ours[6:, ::2] // 1000).astype(int).ravel()) == {2}
        assert set((ours[6:, 1::2] // 1000).astype(int).ravel()) == {3}


def test_repeat_layout_and_odd_pairs() -> None:
    """One frame per temporal token (GeoVR's "repeat" layout): both slots hold that frame; an odd
    clip in pairs repeats its last frame, as the processor does."""
    features = coordinate_features(3, 2, 2)
    repeat = gather_spatial_tokens(features, grid_t=3)
    assert repeat.shape == (3, 4 * 3 * 2)
    assert torch.equal(repeat[:, ::2], repeat[:, 1::2])
    assert repeat[:, 0].tolist() == [0.0, 1.0, 2.0]  # the frame channel of window position 0
    pairs = gather_spatial_tokens(features, grid_t=2)
    np.testing.assert_array_equal(pairs[1, :2].numpy(), [2.0, 2.0])  # frames 2 and (repeated) 2
    with pytest.raises(ValueError, match="do not fill 4 temporal tokens"):
        gather_spatial_tokens(features, grid_t=4)


def test_connector_forward_is_mlp_add_connector() -> None:
    """video + Linear(GELU(Linear(RMSNorm(gathered)))), computed here by hand; shapes of
    MLPAddConnector (merged width 2 * 2 * D * 2, output the language width) and its parameters."""
    torch.manual_seed(0)
    dim, language = 6, 10
    connector = SpatialConnector(dim, language)
    with torch.no_grad():
        connector.norm.weight.uniform_(0.5, 1.5)
    features = torch.randn(4, 4, 6, dim)
    grid = torch.tensor([2, 4, 6])
    video = torch.randn(2 * 2 * 3, language)
    out = connector(video, features, grid)

    gathered = gather_spatial_tokens(features, 2)
    normed = gathered / torch.sqrt(gathered.pow(2).mean(-1, keepdim=True) + 1e-6) * connector.norm.weight
    first, second = connector.mlp[0], connector.mlp[2]
    hidden = torch.nn.functional.gelu(normed @ first.weight.T + first.bias)
    torch.testing.assert_close(out, video + hidden @ second.weight.T + second.bias)

    merged = 2 * 2 * dim * 2
    assert connector.merged_dim == merged and tuple(first.weight.shape) == (merged, merged)
    assert tuple(second.weight.shape) == (language, merged)
    params = sum(p.numel() for p in connector.parameters())
    assert params == merged * merged + merged + merged * language + language + merged
    # VGGT-1B at full width (2048) into Qwen3-VL-2B's 2048: Spatial-MLLM's 302M-parameter connector.
    with torch.device("meta"):
        full = SpatialConnector(2048, 2048)
    assert full.merged_dim == 16384 and sum(p.numel() for p in full.parameters()) == 302_024_704
    assert connector_flops(merged, language, 12) == 3 * 2 * (merged * merged + merged * language) * 12


def test_connector_refuses_a_misaligned_grid() -> None:
    connector = SpatialConnector(4, 8)
    with pytest.raises(ValueError, match="do not match the video's patch grid"):
        connector(torch.zeros(6, 8), torch.zeros(2, 4, 6, 4), torch.tensor([1, 4, 8]))
