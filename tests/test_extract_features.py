import torch

from extract_features import cell_neighbourhood_features


def test_cell_neighbourhood_features_against_a_loop():
    """Values encode (image, level, channel, y, x), so each column can be checked by hand."""
    grid_sizes = [(3, 4), (2, 2)]
    num_anchors = 2  # anchor types per cell
    num_feat = 3

    def level_map(level, h, w):
        n, c, y, x = torch.meshgrid(
            torch.arange(2), torch.arange(num_feat), torch.arange(h), torch.arange(w), indexing="ij"
        )
        return (1 + n * 10000 + level * 1000 + c * 100 + y * 10 + x).float()  # never 0: 0 means outside

    head_features = [level_map(lvl, h, w) for lvl, (h, w) in enumerate(grid_sizes)]
    num_anchors_per_level = [h * w * num_anchors for h, w in grid_sizes]  # [24, 8]
    # Level 0 cell (0, 0) type 1 -> 1; level 0 cell (1, 2) type 0 -> (1 * 4 + 2) * 2 = 12;
    # level 1 cell (1, 1) type 1 -> 24 + 3 * 2 + 1 = 31.
    anchor_idxs = torch.tensor([1, 12, 31])
    cells = [(0, 0, 0), (0, 1, 2), (1, 1, 1)]  # (level, y, x)
    out = cell_neighbourhood_features(head_features, anchor_idxs, 1, num_anchors_per_level, grid_sizes)
    assert out.shape == (3, 9 * num_feat)
    for row, (level, y, x) in enumerate(cells):
        h, w = grid_sizes[level]
        for c in range(num_feat):
            for dy in range(3):
                for dx in range(3):
                    yy, xx = y + dy - 1, x + dx - 1
                    inside = 0 <= yy < h and 0 <= xx < w
                    expected = 1 + 10000 + level * 1000 + c * 100 + yy * 10 + xx if inside else 0
                    assert out[row, c * 9 + dy * 3 + dx].item() == expected, (row, c, dy, dx)
    # The corner cell sees 4 of its 9 neighbours per channel; the interior cell all 9.
    assert (out[0] != 0).sum() == 4 * num_feat and (out[1] != 0).sum() == 9 * num_feat
