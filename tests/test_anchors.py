import importlib.util
import json
import math
import os

import pytest
import torch
from torchvision.ops import box_convert

from layers.anchor_sets import feature_sizes, original_anchor_whs, shipped_anchor_file
from layers.anchors import (
    AnchorGenerator,
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
    # A different k cannot be loaded into this generator.
    sd3 = AnchorGenerator(predefined_anchor_whs(num_scales=3)).state_dict()
    with pytest.raises(RuntimeError):
        gen.load_state_dict(sd3)


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


# ---------------------------------------------------------------------------------------------
# the original codebase's anchor sets and centre layout (layers/anchor_sets.py)

VOC_ORIGINAL = [
    (0.0433, 0.1438), (0.0398, 0.0629), (0.0983, 0.0683), (0.0736, 0.2678), (0.0875, 0.1306),
    (0.2076, 0.1170), (0.1426, 0.4120), (0.1401, 0.2035), (0.2647, 0.2684), (0.2297, 0.6208),
    (0.3709, 0.4549), (0.6085, 0.2921), (0.4404, 0.7740), (0.8366, 0.8730), (0.7577, 0.5387),
]  # fmt: skip
COCO_ORIGINAL = [
    (0.0303, 0.0847), (0.0178, 0.0297), (0.0636, 0.0395), (0.0578, 0.2030), (0.0771, 0.0975),
    (0.1852, 0.0742), (0.1184, 0.3661), (0.1385, 0.1778), (0.3055, 0.1610), (0.2054, 0.6091),
    (0.2756, 0.3349), (0.6240, 0.2592), (0.4125, 0.6808), (0.8336, 0.8634), (0.7504, 0.4907),
]  # fmt: skip


@pytest.mark.parametrize("name, k, expected", [("pdf9", 9, 67995), ("pdf6", 6, 45330), ("default", 3, 22665)])
def test_original_sets_counts_at_600(name, k, expected):
    gen = AnchorGenerator(original_anchor_whs(name, 600), layout="original")
    assert gen.num_anchors_per_location == k
    assert gen.anchors_for_input(600, 600).shape == (expected, 4)
    assert feature_sizes(600) == [75, 38, 19, 10, 5]


def test_original_sets_hand_computed_shapes_and_order():
    pdf9 = original_anchor_whs("pdf9", 600)
    # P3: c = 2.4, f = 75 -> base side 2.4 * 600 / 75 = 19.2. ar = w / h = 0.5: h = 19.2 / sqrt(0.5).
    h = 19.2 / math.sqrt(0.5)
    # Ratio major, then scale: (0.5, 1), (0.5, 1.34), (0.5, 1.67), (1, 1), ...
    expected_p3 = [(0.5 * h * s, h * s) for s in (1, 1.34, 1.67)] + [
        (19.2 * s, 19.2 * s) for s in (1, 1.34, 1.67)
    ]
    h15 = 19.2 / math.sqrt(1.5)
    expected_p3 += [(1.5 * h15 * s, h15 * s) for s in (1, 1.34, 1.67)]
    torch.testing.assert_close(
        pdf9[0].double(), torch.tensor(expected_p3, dtype=torch.float64), rtol=1e-6, atol=1e-4
    )
    default = original_anchor_whs("default", 600)
    # P4: c = 3, f = 38 -> side 3 * 600 / 38 = 47.368; ar 0.54: h = side / sqrt(0.54), w = 0.54 h.
    side = 3 * 600 / 38
    expected_p4 = [(0.54 * side / math.sqrt(0.54), side / math.sqrt(0.54)), (side, side)]
    expected_p4.append((1.45 * side / math.sqrt(1.45), side / math.sqrt(1.45)))
    torch.testing.assert_close(
        default[1].double(), torch.tensor(expected_p4, dtype=torch.float64), rtol=1e-6, atol=1e-4
    )
    # P7: c = 3.4, f = 5 -> 408 px squares for ratio 1.
    torch.testing.assert_close(default[4][1], torch.tensor([408.0, 408.0]))


def test_original_sets_scale_with_the_input():
    # At 300 the real feature sizes are 38, 19, 10, 5, 3 (not the original's hard-coded 75, 38, ...).
    assert feature_sizes(300) == [38, 19, 10, 5, 3]
    p3 = original_anchor_whs("default", 300)[0]
    torch.testing.assert_close(p3[1], torch.tensor([2.8 * 300 / 38] * 2))
    # Where the strides divide the input the base side is c * stride.
    torch.testing.assert_close(original_anchor_whs("pdf9", 512)[2][3], torch.tensor([3.0 * 32] * 2))


def test_original_layout_centres_at_600():
    whs = original_anchor_whs("default", 600)
    orig = AnchorGenerator(whs, layout="original").anchors_for_input(600, 600)
    ours = AnchorGenerator(whs).anchors_for_input(600, 600)
    centres = (orig[:, :2] + orig[:, 2:]) / 2
    counts = [75 * 75 * 3, 38 * 38 * 3, 19 * 19 * 3, 10 * 10 * 3, 5 * 5 * 3]
    starts = [sum(counts[:i]) for i in range(5)]
    # Last cell of P4: (37 + 0.5) / 38 * 600 = 592.105 (stride layout: 600); row-major, so x and y.
    last_p4 = starts[1] + counts[1] - 1
    torch.testing.assert_close(centres[last_p4], torch.tensor([37.5 / 38 * 600] * 2))
    # P6: 10 cells of 60 px: last centre 570 (stride layout: 9.5 * 64 = 608).
    torch.testing.assert_close(centres[starts[3] + counts[3] - 1], torch.tensor([570.0, 570.0]))
    assert ours[starts[3] + counts[3] - 1].tolist() == [608 - whs[3][2][0] / 2, 608 - whs[3][2][1] / 2] + [
        608 + whs[3][2][0] / 2,
        608 + whs[3][2][1] / 2,
    ]
    # P3 (600 / 75 = 8 = its stride): both layouts agree.
    torch.testing.assert_close(orig[: counts[0]], ours[: counts[0]])
    # Second cell of P5 (row 0, column 1), its 3 anchors: centre x = 1.5 / 19 * 600.
    torch.testing.assert_close(centres[starts[2] + 3 : starts[2] + 6, 0], torch.full((3,), 1.5 / 19 * 600))
    torch.testing.assert_close(centres[starts[2] + 3 : starts[2] + 6, 1], torch.full((3,), 0.5 / 19 * 600))


def test_original_layout_needs_the_input_size_and_is_cached_per_size():
    gen = AnchorGenerator(original_anchor_whs("default", 600), layout="original")
    with pytest.raises(ValueError, match="input size"):
        gen(gen.grid_sizes_for_input(600, 600))
    # Two inputs with the same grids (593 and 600 both give 75, 38, ...) get different centres.
    a = gen.anchors_for_input(600, 600)
    b = gen.anchors_for_input(593, 593)
    assert a.shape == b.shape and not torch.equal(a, b)
    assert gen.anchors_for_input(600, 600) is a
    with pytest.raises(ValueError, match="layout"):
        AnchorGenerator(original_anchor_whs("default", 600), layout="centre")


@pytest.mark.parametrize("dataset, numbers", [("voc", VOC_ORIGINAL), ("coco", COCO_ORIGINAL)])
def test_shipped_kmeans_sets_are_the_originals(dataset, numbers):
    path = shipped_anchor_file(dataset)
    assert os.path.basename(path) == f"original_{dataset}.json"
    whs, meta = load_anchor_file(path, expected_strides=(8, 16, 32, 64, 128), input_side=600)
    assert meta["layout"] == "original" and meta["units"] == "input_fraction"
    assert "gurkirt/FPN.pytorch1.0" in meta["source"]
    expected = torch.tensor(numbers, dtype=torch.float32).reshape(5, 3, 2) * 600  # P3 first
    torch.testing.assert_close(torch.stack(whs), expected)
    # Fractions of the input side: they scale with it.
    half, _ = load_anchor_file(path, input_side=300)
    torch.testing.assert_close(torch.stack(half), expected / 2)
    with pytest.raises(ValueError, match="fractions of the input side"):
        load_anchor_file(path)


def _cli(*argv):
    from utils.options import get_common_parser, resolve_defaults

    args = resolve_defaults(get_common_parser().parse_args(list(argv)))
    args.num_classes = 3
    return args


def test_kmeans_without_file_uses_the_shipped_set_for_voc_and_coco_only():
    from models import build_anchors
    from utils.options import check_common_args, run_name

    args = _cli("--dataset", "voc", "--anchor_type", "kmeans", "--input_dim", "600")
    check_common_args(args)
    assert args.anchor_file == shipped_anchor_file("voc")
    assert "kmeans-original_voc" in run_name(args)
    whs, layout = build_anchors(_cli("--dataset", "coco", "--anchor_type", "kmeans"))
    assert layout == "original"
    torch.testing.assert_close(whs[0][1], torch.tensor(COCO_ORIGINAL[1]) * 600)
    args = _cli("--dataset", "shapes", "--anchor_type", "kmeans")
    with pytest.raises(SystemExit, match="kmeans_for_anchors.py --dataset shapes"):
        check_common_args(args)
    with pytest.raises(ValueError, match="kmeans_for_anchors.py"):
        build_anchors(args)


def test_build_anchors_layouts_and_checkpoint_rebuild(tmp_path, caplog):
    from models import build_anchors

    whs, layout = build_anchors(_cli("--anchor_type", "pdf9", "--input_dim", "600"))
    assert layout == "original" and [tuple(w.shape) for w in whs] == [(9, 2)] * 5
    torch.testing.assert_close(torch.stack(whs), torch.stack(original_anchor_whs("pdf9", 600)))
    # keep_aspect: the original's sets are computed for a square of --min_size.
    whs, _ = build_anchors(
        _cli("--anchor_type", "default", "--resize_mode", "keep_aspect", "--min_size", "512")
    )
    torch.testing.assert_close(torch.stack(whs), torch.stack(original_anchor_whs("default", 512)))
    assert build_anchors(_cli())[1] == "stride"
    # A kmeans file written by kmeans_for_anchors.py --method per_level: stride layout.
    path = str(tmp_path / "mine.json")
    save_anchor_file(path, predefined_anchor_whs(1), resize_mode="square", input_dim=600)
    assert build_anchors(_cli("--anchor_type", "kmeans", "--anchor_file", path))[1] == "stride"
    # Anchors from a checkpoint whose file is gone: the layout alone, with a warning.
    args = _cli("--anchor_type", "kmeans", "--anchor_file", str(tmp_path / "gone.json"))
    with caplog.at_level("WARNING"):
        assert build_anchors(args, need_whs=False) == (None, "stride")
    assert "gone.json" in caplog.text
    # A shipped file's path from another checkout resolves to ours.
    args = _cli("--anchor_type", "kmeans", "--anchor_file", "/elsewhere/anchors/original_voc.json")
    assert build_anchors(args)[1] == "original"


def test_detector_uses_the_original_layout():
    from models import build_model

    args = _cli(
        "--anchor_type", "pdf9", "--input_dim", "100", "--basenet", "resnet18", "--pretrained", "none",
        "--fpn_channels", "32", "--num_head_layers", "1",
    )  # fmt: skip
    model = build_model(args)[0].eval()
    assert model.anchor_generator.layout == "original"
    with torch.no_grad():
        out = model(torch.randn(1, 3, 100, 100))
    # 100 px: grids 13, 7, 4, 2, 1; P7's single cell is centred on the image (50, 50), not at 64.
    assert out["grid_sizes"] == [(13, 13), (7, 7), (4, 4), (2, 2), (1, 1)]
    assert torch.equal(out["anchors"], model.anchor_generator.anchors_for_input(100, 100))
    last = out["anchors"][-9:]
    torch.testing.assert_close((last[:, :2] + last[:, 2:]) / 2, torch.full((9, 2), 50.0))
    assert out["pred_box_deltas"].shape[1] == out["anchors"].shape[0] == 9 * (169 + 49 + 16 + 4 + 1)


ORIGINAL_REPO = os.environ.get("FPN_ORIGINAL_REPO")


def _load_original(module):
    path = os.path.join(ORIGINAL_REPO, "modules", f"{module}.py")
    spec = importlib.util.spec_from_file_location(f"original_{module}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.mark.skipif(not ORIGINAL_REPO, reason="set FPN_ORIGINAL_REPO to a checkout of gurkirt/FPN.pytorch1.0")
@pytest.mark.parametrize(
    "anchor_type, dataset", [("pdf9", None), ("default", None), ("kmeans", "voc"), ("kmeans", "coco")]
)
def test_anchors_equal_the_original_codebase(anchor_type, dataset):
    """The original's anchorBox output (cx, cy, w, h as fractions of 600), in its order, equals ours."""
    from models import build_anchors

    if anchor_type == "kmeans":
        expected = _load_original("anchor_box_kmeans").anchorBox(input_dim=600, dataset=dataset).forward()
        kmeaned = _load_original("anchor_box_kmeans").anchor_boxes_kmeaned[dataset][:, 2:]
        torch.testing.assert_close(
            torch.tensor(kmeaned, dtype=torch.float32),
            torch.tensor(dict(voc=VOC_ORIGINAL, coco=COCO_ORIGINAL)[dataset]),
        )
    else:
        expected = _load_original("anchor_box_base").anchorBox(anchor_type, input_dim=600).forward()
    argv = ["--anchor_type", anchor_type, "--input_dim", "600"] + (["--dataset", dataset] if dataset else [])
    whs, layout = build_anchors(_cli(*argv))
    ours = AnchorGenerator(whs, layout=layout).anchors_for_input(600, 600)
    assert ours.shape == expected.shape
    torch.testing.assert_close(
        ours, box_convert(expected.double() * 600, "cxcywh", "xyxy").float(), atol=2e-3, rtol=0
    )
