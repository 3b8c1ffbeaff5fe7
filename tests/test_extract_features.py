import os

import cv2
import pytest
import torch
from inference_helpers import train_tiny, val_images
from tiny_shapes import make_tiny_shapes

import extract_features
from extract_features import cell_neighbourhood_features
from utils.errors import UserError


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


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_shapes(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    return train_tiny(data_root, tmp_path_factory.mktemp("runs"))


def run_extract(checkpoint, images, out, *extra):
    argv = ["--checkpoint", checkpoint, "--images", *images, "--save_path", str(out), "--conf_thresh", "0"]
    return extract_features.main(extract_features.get_args_parser().parse_args(argv + list(extra)))


def test_same_names_in_two_folders_give_two_files(checkpoint, data_root, tmp_path, capsys):
    src = val_images(data_root)
    for sub, image in (("train", src[0]), ("val", src[1])):
        (tmp_path / "in" / sub).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "in" / sub / "000.png"), cv2.imread(image))
    summary = run_extract(
        checkpoint, [str(tmp_path / "in" / "train"), str(tmp_path / "in" / "val")], tmp_path / "out"
    )
    assert summary["num_images"] == 2 and summary["num_skipped"] == 0
    a, b = (torch.load(tmp_path / "out" / sub / "000.pth", weights_only=True) for sub in ("train", "val"))
    assert a.shape == b.shape == (10, 1 + 4 + 4 + 9 * 16) and not torch.equal(a, b)
    assert "wrote 2 feature tensors" in capsys.readouterr().out


def test_bad_images_stop_or_are_skipped_and_counted(checkpoint, data_root, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), cv2.imread(val_images(data_root)[0]))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(UserError, match=r"cannot read image '.*broken\.jpg' \(pass --skip_bad_images"):
        run_extract(checkpoint, [str(folder)], tmp_path / "out1", "-j", "1")
    summary = run_extract(checkpoint, [str(folder)], tmp_path / "out2", "-j", "1", "--skip_bad_images")
    assert summary["num_images"] == 1 and summary["num_skipped"] == 1
    assert os.listdir(tmp_path / "out2") == ["good.pth"]


def test_an_empty_folder_is_an_error(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        run_extract(checkpoint, [str(tmp_path / "empty")], tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_flip_tta_is_refused(checkpoint, data_root, tmp_path):
    """A feature row belongs to one anchor of the plain pass: --tta flip would mix rows of two passes."""
    with pytest.raises(SystemExit, match="--tta flip does not apply to extract_features.py"):
        run_extract(checkpoint, [val_images(data_root)[0]], tmp_path / "out", "--tta", "flip")
    assert not os.path.exists(tmp_path / "out")
