import json
import math

import pytest
import torch

from layers.anchors import (
    AnchorGenerator,
    anchor_whs_from_state_dict,
    load_anchor_file,
    predefined_anchor_whs,
    save_anchor_file,
)


@pytest.mark.parametrize("num_scales, expected", [(3, 67995), (2, 45330), (1, 22665)])
def test_anchor_counts_at_600(num_scales, expected):
    gen = AnchorGenerator(predefined_anchor_whs(num_scales=num_scales))
    grid_sizes = gen.grid_sizes_for_input(600, 600)
    assert grid_sizes == [(75, 75), (38, 38), (19, 19), (10, 10), (5, 5)]
    anchors = gen(grid_sizes, torch.device("cpu"))
    assert anchors.shape == (expected, 4)
    assert sum(gen.num_anchors_per_level(grid_sizes)) == expected
    assert gen.num_anchors_per_location == 3 * num_scales


def test_predefined_sizes():
    whs = predefined_anchor_whs(num_scales=3, aspect_ratios=(0.5, 1.0, 2.0))
    assert len(whs) == 5 and all(w.shape == (9, 2) for w in whs)
    p3 = whs[0].double()
    # Scale-major then ratio: entry 1 is scale 1, ratio 1 -> a 32 x 32 square.
    assert torch.allclose(p3[1], torch.tensor([32.0, 32.0], dtype=torch.float64))
    # Ratio 2 (h / w) keeps the area: w = 32 / sqrt(2), h = 32 * sqrt(2).
    assert torch.allclose(p3[2], torch.tensor([32 / math.sqrt(2), 32 * math.sqrt(2)], dtype=torch.float64))
    # Third scale of P3: 32 * 2^(2/3), square.
    s = 32 * 2 ** (2 / 3)
    assert torch.allclose(p3[7], torch.tensor([s, s], dtype=torch.float64), atol=1e-4)
    areas = p3[:, 0] * p3[:, 1]
    assert torch.allclose(areas[:3], torch.full((3,), 32.0**2, dtype=torch.float64), rtol=1e-5)
    assert torch.allclose(whs[4][1], torch.tensor([512.0, 512.0]))


def test_anchor_centres_and_order():
    whs = [torch.tensor([[10.0, 20.0], [30.0, 40.0]])] * 2
    gen = AnchorGenerator(whs, strides=(8, 16))
    grid_sizes = gen.grid_sizes_for_input(20, 33)  # ceil: (3, 5) and (2, 3)
    assert grid_sizes == [(3, 5), (2, 3)]
    anchors = gen(grid_sizes)
    assert anchors.shape == ((15 + 6) * 2, 4)
    i = 0
    # Level-major, then row-major (y, then x), then anchor type.
    for (gh, gw), stride in zip(grid_sizes, (8, 16)):
        for y in range(gh):
            for x in range(gw):
                for w, h in whs[0].tolist():
                    cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
                    expected = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                    assert torch.equal(anchors[i], expected), (i, anchors[i], expected)
                    i += 1


def test_centres_on_cell_grid_at_600():
    gen = AnchorGenerator(predefined_anchor_whs(num_scales=1))
    grid_sizes = gen.grid_sizes_for_input(600, 600)
    anchors = gen(grid_sizes)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    start = 0
    for (gh, gw), stride, n in zip(grid_sizes, gen.strides, gen.num_anchors_per_level(grid_sizes)):
        c = centres[start : start + n].reshape(gh, gw, 3, 2)
        expected_x = (torch.arange(gw) + 0.5) * stride
        expected_y = (torch.arange(gh) + 0.5) * stride
        assert torch.allclose(c[..., 0], expected_x[None, :, None].expand(gh, gw, 3))
        assert torch.allclose(c[..., 1], expected_y[:, None, None].expand(gh, gw, 3))
        start += n
    assert start == anchors.shape[0]


def test_cache_and_state_dict_reload():
    gen = AnchorGenerator(predefined_anchor_whs(num_scales=1))
    a1 = gen.anchors_for_input(64, 64)
    assert gen.anchors_for_input(64, 64) is a1  # cached
    other = AnchorGenerator(predefined_anchor_whs(num_scales=1, base_sizes=(20, 40, 80, 160, 320)))
    gen.load_state_dict(other.state_dict())
    a2 = gen.anchors_for_input(64, 64)
    assert torch.equal(a2, other.anchors_for_input(64, 64))
    assert not torch.equal(a1, a2)
    # A different k cannot be loaded into this generator; rebuild it from the state dict instead.
    sd3 = AnchorGenerator(predefined_anchor_whs(num_scales=3)).state_dict()
    with pytest.raises(RuntimeError):
        gen.load_state_dict(sd3)
    rebuilt = AnchorGenerator(anchor_whs_from_state_dict(sd3))
    assert rebuilt.num_anchors_per_location == 9


def test_cache_is_bounded():
    gen = AnchorGenerator(predefined_anchor_whs(num_scales=1), max_cache_entries=2)
    for size in (32, 64, 96):
        gen.anchors_for_input(size, size)
    assert len(gen._cache) == 2


def test_generator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="differ"):
        AnchorGenerator([torch.ones(2, 2), torch.ones(3, 2)], strides=(8, 16))
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator([torch.ones(2, 2)], strides=(8, 16))
    with pytest.raises(ValueError, match="positive"):
        AnchorGenerator([torch.tensor([[1.0, 0.0]])], strides=(8,))


def test_anchor_file_round_trip(tmp_path):
    path = str(tmp_path / "anchors.json")
    whs = [torch.tensor([[10.5, 20.25], [30.0, 15.0], [7.0, 9.0]]) * (i + 1) for i in range(5)]
    save_anchor_file(
        path,
        whs,
        resize_mode="square",
        input_dim=600,
        min_size=600,
        max_size=1000,
        dataset="voc",
        train_sets=["2007_trainval"],
    )
    loaded, meta = load_anchor_file(path, expected_strides=(8, 16, 32, 64, 128))
    assert len(loaded) == 5
    for a, b in zip(whs, loaded):
        assert torch.allclose(a, b)
    assert meta["strides"] == [8, 16, 32, 64, 128]
    assert meta["resize_mode"] == "square" and meta["train_sets"] == ["2007_trainval"]
    assert AnchorGenerator(loaded).num_anchors_per_location == 3


def _write(tmp_path, record, name="a.json"):
    path = tmp_path / name
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return str(path)


def _good_record():
    return {
        "format": "fpn-ohem-anchors",
        "version": 1,
        "strides": [8, 16],
        "anchors_per_level": [[[10, 20], [5, 5]], [[30, 40], [9, 9]]],
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(format="something-else"), "not an anchor file"),
        (lambda r: r.update(version=2), "version 2"),
        (lambda r: r.update(strides=[8, 16, 32]), "2 anchor levels but 3 strides"),
        (lambda r: r["anchors_per_level"][1].__setitem__(0, [30, -1]), "positive"),
        (lambda r: r["anchors_per_level"][1].__setitem__(0, [0, 4]), "positive"),
        (lambda r: r["anchors_per_level"][1].append([3, 3]), "differ"),
        (lambda r: r["anchors_per_level"][0].__setitem__(0, [1, 2, 3]), "pairs"),
        (lambda r: r.pop("anchors_per_level"), "anchors_per_level"),
    ],
)
def test_anchor_file_errors_name_the_file(tmp_path, change, message):
    record = _good_record()
    change(record)
    path = _write(tmp_path, record)
    with pytest.raises(ValueError, match=message) as e:
        load_anchor_file(path)
    assert path in str(e.value)


def test_anchor_file_not_json_and_stride_mismatch(tmp_path):
    path = _write(tmp_path, "{not json")
    with pytest.raises(ValueError, match="not a JSON") as e:
        load_anchor_file(path)
    assert path in str(e.value)
    path = _write(tmp_path, _good_record(), "b.json")
    load_anchor_file(path)  # valid on its own
    with pytest.raises(ValueError, match="strides") as e:
        load_anchor_file(path, expected_strides=(8, 16, 32))
    assert path in str(e.value)


def test_save_rejects_bad_anchors(tmp_path):
    path = str(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="bad.json"):
        save_anchor_file(path, [torch.ones(2, 2), torch.ones(2, 2)])  # 2 levels, 5 default strides
