"""Open Images end to end: CSVs -> prep/openimages.py -> train.py on a frequency bin (class subset,
class-balanced sampling, aspect-ratio grouping, keep-aspect input) -> evaluate.py --metric oid with a
submission -> merge_submissions.py -> the challenge metric on the merged file.

Fixture (all images 64 x 64, box corners multiples of 4 px, so every normalised coordinate is exact):

  classes (category ids 1..4): Apple /m/apple, Banana /m/banana, Cherry /m/cherry, Fruit /m/fruit
  hierarchy: Entity (root) -> Food (not a class) -> Fruit -> {Apple, Banana, Cherry}

  train (24 images, t00..t23)
    t00..t19  Apple (20 of 24 images, 83%): one Apple box each; t00, t01 a second Apple box; t02 also an
              Apple group-of box; t03, t04 a Cherry box; t06 a Fruit box
    t20..t23  Banana (4 of 24 images, 17%): one Banana box each, t20 a second one; t21 a Cherry box
    verified labels: each image's class present; Banana absent on t00, t05, t10, t15
    boxes: Apple 20 + 2 + 1 = 23, Banana 5, Cherry 3, Fruit 1 -> frequency bins (most boxes first):
    bin_0 = [Apple, Banana], bin_1 = [Cherry, Fruit]. No train image holds both Apple and Banana.

  validation (8 images, v0..v7; P = verified present, A = verified absent)
    v0  Apple                                  P Apple
    v1  Apple, Banana                          P Apple, Banana
    v2  Banana, Banana group-of                P Banana
    v3  Cherry, Apple                          P Cherry, Apple; A Banana
    v4  (no box)                               A Apple, Banana
    v5  Fruit                                  P Fruit
    v6  Apple                                  A Banana
    v7  Banana                                 (no verified label)
"""

import itertools
import json
import os

import cv2
import numpy as np
import pytest
import torch

import evaluate
import merge_submissions
import train
from data.dataset import DetectionDataset
from data.loaders import build_train_loader, iterate_batches
from data.transforms import build_transforms
from layers.matcher import BACKGROUND, IGNORE, match_anchors, pad_targets
from metrics.oid.submission import oid_submission_to_coco_results, read_oid_submission, write_oid_submission
from prep import openimages

SIZE = 64
CLASSES = [("/m/apple", "Apple"), ("/m/banana", "Banana"), ("/m/cherry", "Cherry"), ("/m/fruit", "Fruit")]
MID = dict((name, mid) for mid, name in CLASSES)
CATEGORY_ID = {name: i + 1 for i, (_, name) in enumerate(CLASSES)}
COLOURS = {"Apple": (220, 30, 30), "Banana": (240, 220, 40), "Cherry": (120, 0, 60), "Fruit": (40, 170, 60)}
HIERARCHY = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {
            "LabelName": "/m/food",
            "Subcategory": [
                {
                    "LabelName": "/m/fruit",
                    "Subcategory": [
                        {"LabelName": "/m/apple"},
                        {"LabelName": "/m/banana"},
                        {"LabelName": "/m/cherry"},
                    ],
                }
            ],
        }
    ],
}

# Boxes in pixels (x1, y1, x2, y2); quadrant slots keep the objects of one image apart.
SLOTS = [(4, 4, 28, 28), (36, 4, 60, 28), (4, 36, 28, 60), (36, 36, 60, 60)]
SMALL = [(8, 8, 24, 24), (40, 8, 56, 24), (8, 40, 24, 56), (40, 40, 56, 56)]


def image_key(split: str, i: int) -> str:
    # ImageIDs are 16 hex digits; the image id is the first 13, distinct between the splits.
    return f"{(1 if split == 'train' else 2) * 4096 + i:013x}0ab"


def train_layout():
    """[(key, [(class, box, group_of)], present, absent)] of the train split (see the module docstring)."""
    images = []
    for i in range(24):
        cls = "Apple" if i < 20 else "Banana"
        boxes = [(cls, SLOTS[i % 4], 0)]
        if i in (0, 1, 20):
            boxes.append((cls, SMALL[(i + 2) % 4], 0))
        if i == 2:
            boxes.append(("Apple", SLOTS[(i + 1) % 4], 1))
        if i in (3, 4, 21):
            boxes.append(("Cherry", SMALL[(i + 1) % 4], 0))
        if i == 6:
            boxes.append(("Fruit", SLOTS[(i + 3) % 4], 0))
        present = [cls]
        absent = ["Banana"] if cls == "Apple" and i % 5 == 0 else []
        images.append((image_key("train", i), boxes, present, absent))
    return images


def val_layout():
    s = SLOTS
    rows = [
        ([("Apple", s[0], 0)], ["Apple"], []),
        ([("Apple", s[1], 0), ("Banana", s[2], 0)], ["Apple", "Banana"], []),
        ([("Banana", s[0], 0), ("Banana", (32, 32, 64, 64), 1)], ["Banana"], []),
        ([("Cherry", SMALL[3], 0), ("Apple", s[0], 0)], ["Cherry", "Apple"], ["Banana"]),
        ([], [], ["Apple", "Banana"]),
        ([("Fruit", s[2], 0)], ["Fruit"], []),
        ([("Apple", s[3], 0)], [], ["Banana"]),
        ([("Banana", s[1], 0)], [], []),
    ]
    return [(image_key("validation", i), *row) for i, row in enumerate(rows)]


def draw_image(boxes, rng) -> np.ndarray:
    """RGB uint8 [64, 64, 3]: a noisy grey background, each object a filled ellipse of its class colour
    (a group-of box: three small ellipses spread over it)."""
    image = np.clip(rng.normal(128, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    for cls, (x1, y1, x2, y2), group_of in boxes:
        colour = COLOURS[cls]
        if group_of:
            w, h = (x2 - x1) / 3, (y2 - y1) / 2
            for k in range(3):
                cx, cy = int(x1 + w * (k + 0.5)), int(y1 + h * (0.5 + (k % 2)))
                cv2.ellipse(image, (cx, cy), (int(w / 2), int(h / 2)), 0, 0, 360, colour, -1)
        else:
            centre = ((x1 + x2) // 2, (y1 + y2) // 2)
            cv2.ellipse(image, centre, ((x2 - x1) // 2, (y2 - y1) // 2), 0, 0, 360, colour, -1)
    return image


def write_split(tmp_path, split: str, layout, seed: int):
    """Images and the two CSVs of one split, as Open Images ships them."""
    image_dir = tmp_path / f"oid_{split}"
    image_dir.mkdir()
    rng = np.random.default_rng(seed)
    box_rows = [
        "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,"
        "IsGroupOf,IsDepiction,IsInside"
    ]
    label_rows = ["ImageID,Source,LabelName,Confidence"]
    for key, boxes, present, absent in layout:
        image = draw_image(boxes, rng)
        cv2.imwrite(str(image_dir / f"{key}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        for cls, (x1, y1, x2, y2), group_of in boxes:
            coords = ",".join(f"{v / SIZE:g}" for v in (x1, x2, y1, y2))
            box_rows.append(f"{key},xclick,{MID[cls]},1,{coords},0,0,{group_of},0,0")
        label_rows += [f"{key},verification,{MID[c]},1" for c in present]
        label_rows += [f"{key},verification,{MID[c]},0" for c in absent]
    paths = {"image_dir": str(image_dir)}
    for name, rows in (("boxes", box_rows), ("image_labels", label_rows)):
        paths[name] = str(tmp_path / f"{split}-{name}.csv")
        with open(paths[name], "w") as f:
            f.write("\n".join(rows) + "\n")
    return paths


@pytest.fixture(scope="module")
def oid(tmp_path_factory):
    """The fixture converted by prep/openimages.py; returns paths and the two prep summaries."""
    tmp_path = tmp_path_factory.mktemp("oid")
    class_descriptions = tmp_path / "class-descriptions-boxable.csv"
    class_descriptions.write_text("".join(f"{mid},{name}\n" for mid, name in CLASSES))
    hierarchy = tmp_path / "bbox_labels_600_hierarchy.json"
    hierarchy.write_text(json.dumps(HIERARCHY))
    data_root = str(tmp_path / "datasets")
    summaries = {}
    for split, layout, extra in (
        ("train", train_layout(), ["--frequency_bins", "2"]),
        ("validation", val_layout(), []),
    ):
        paths = write_split(tmp_path, split, layout, seed=len(split))
        argv = [
            "--split", split, "--data_root", data_root, "--class_descriptions", str(class_descriptions),
            "--hierarchy", str(hierarchy), "--num_workers", "1", *extra,
            *[f"--{k}={v}" for k, v in paths.items()],
        ]  # fmt: skip
        summaries.update(openimages.main(openimages.get_args_parser().parse_args(argv)))
    root = os.path.join(data_root, "openimages")
    return {
        "tmp": tmp_path,
        "data_root": data_root,
        "root": root,
        "summaries": summaries,
        "bin_0": os.path.join(root, "class_bins", "bin_0.txt"),
        "bin_1": os.path.join(root, "class_bins", "bin_1.txt"),
    }


def test_prep_counts_bins_and_labels(oid):
    train_summary, val_summary = oid["summaries"]["train"], oid["summaries"]["validation"]
    assert train_summary["num_images"] == 24 and val_summary["num_images"] == 8
    assert train_summary["boxes_per_class"] == {"Apple": 23, "Banana": 5, "Cherry": 3, "Fruit": 1}
    assert val_summary["boxes_per_class"] == {"Apple": 4, "Banana": 4, "Cherry": 1, "Fruit": 1}
    assert (train_summary["num_crowd"], val_summary["num_crowd"]) == (1, 1)
    assert val_summary["num_images_without_boxes"] == 1  # v4: verified labels only
    assert (val_summary["num_verified_present"], val_summary["num_verified_absent"]) == (7, 4)
    assert train_summary["classes_not_in_hierarchy"] == []
    with open(oid["bin_0"]) as f:
        assert f.read().split() == ["/m/apple", "/m/banana"]
    with open(oid["bin_1"]) as f:
        assert f.read().split() == ["/m/cherry", "/m/fruit"]
    with open(os.path.join(oid["root"], "hierarchy.json")) as f:
        assert json.load(f) == HIERARCHY


def test_boxes_outside_the_class_subset_are_ignored_not_background(oid):
    """With --classes bin_0 (Apple, Banana), Cherry and Fruit boxes get label -1 and their anchors IGNORE;
    with every class they are ordinary positives."""
    transforms = build_transforms(False, "keep_aspect", min_size=SIZE, max_size=SIZE)
    subset = DetectionDataset(oid["root"], ["train"], transforms, classes=["/m/apple", "/m/banana"])
    full = DetectionDataset(oid["root"], ["train"], transforms)
    assert subset.class_names == ["Apple", "Banana"] and subset.category_ids == [1, 2]
    assert subset.num_boxes_outside_classes == 4  # 3 Cherry + 1 Fruit
    # t03: Apple in slot 3, Cherry in small slot 0; the subset keeps the Cherry box with label -1.
    _, target = subset[3]
    _, target_full = full[3]
    assert target["labels"].tolist() == [0, -1] and target_full["labels"].tolist() == [0, 2]
    torch.testing.assert_close(target["boxes"], torch.tensor([SLOTS[3], SMALL[0]], dtype=torch.float32))
    assert [labels.tolist() for labels in subset.image_labels[:4]] == [[0], [0], [0], [0]]

    # Anchors: exactly the Cherry box (IoU 1), exactly the Apple box, one far from both, one overlapping
    # the Cherry box at IoU (16 * 8) / (16 * 16) = 0.5.
    anchors = torch.tensor(
        [list(SMALL[0]), list(SLOTS[3]), [36.0, 4.0, 60.0, 28.0], [8.0, 8.0, 24.0, 16.0]], dtype=torch.float32
    )
    for t, cherry_ignored, expected in (
        (target, True, [IGNORE, 0, BACKGROUND, IGNORE]),
        (target_full, False, [1, 0, BACKGROUND, 1]),
    ):
        gt_boxes, _gt_labels, gt_valid, gt_ignore = pad_targets([t], torch.device("cpu"))
        assert gt_ignore.tolist() == [[False, cherry_ignored]]
        matched = match_anchors(anchors, gt_boxes, gt_valid, gt_ignore, 0.5, 0.4)
        assert matched.tolist() == [expected]


MODEL_OPTS = [
    "--dataset", "openimages", "--basenet", "resnet18", "--pretrained", "none", "--fpn_channels", "16",
    "--num_head_layers", "1", "--num_scales", "1", "--resize_mode", "keep_aspect", "--min_size", "64",
    "--max_size", "64", "--device", "cpu", "-j", "0", "--eval_batch_size", "4",
]  # fmt: skip
TRAIN_OPTS = [
    "--train_sets", "train", "--val_sets", "validation", "--batch_size", "4", "--lr", "0.01",
    "--max_iter", "6", "--step_values", "4", "--warmup_iters", "2", "--save_step", "6", "--val_step", "0",
    "--log_step", "3", "--aspect_ratio_group",
]  # fmt: skip


def run_train(oid, sampler: str, *extra):
    argv = MODEL_OPTS + TRAIN_OPTS + [
        "--data_root", oid["data_root"], "--save_root", str(oid["tmp"] / "runs"), "--run_name", sampler,
        "--classes", oid["bin_0"], "--sampler", sampler, "--num_bins", "1", "--no_val", *extra,
    ]  # fmt: skip
    return train.main(train.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def balanced_run(oid):
    return run_train(oid, "class_balanced")


def test_class_balanced_sampler_delivers_both_classes_equally(oid, balanced_run):
    """What the samplers deliver in 6 iterations of batch 4 (24 images), counted as train.py counts it.

    Hand count: each of the 24 train images holds Apple or Banana, never both, and keeps a box of its
    class through augmentation (the random crop always keeps an object centre, and Cherry / Fruit boxes
    are ignore regions, not objects). An epoch of either sampler is 24 draws = 6 batches (one
    aspect-ratio group: every image is square), so 6 iterations are exactly one epoch.
      class_balanced, one bin: the epoch draws Apple 12 times and Banana 12 times (stratified)
        -> Apple 12, Banana 12, although Banana is in 4 of 24 images.
      random: the epoch is a permutation of the 24 images -> Apple 20, Banana 4.
    The random case runs the training loader alone (the same build_train_loader call as train.py): a
    second training run would only add minutes of CPU to the same count.
    """
    assert balanced_run["iteration"] == 6
    assert balanced_run["images_per_class"] == {"Apple": 12, "Banana": 12}
    with open(os.path.join(balanced_run["run_dir"], "args.json")) as f:
        stored = json.load(f)
    assert (stored["sampler"], stored["classes"], stored["aspect_ratio_group"]) == (
        "class_balanced",
        oid["bin_0"],
        True,
    )

    transforms = build_transforms(True, "keep_aspect", min_size=SIZE, max_size=SIZE)
    dataset = DetectionDataset(oid["root"], ["train"], transforms, classes=["/m/apple", "/m/banana"])
    delivered = {}
    for sampler in ("random", "class_balanced"):
        loader = build_train_loader(
            dataset, 4, 0, size_divisibility=32, seed=123, sampler=sampler, aspect_ratio_group=True
        )
        counts = torch.zeros(2, dtype=torch.int64)
        batches = itertools.islice(iterate_batches(loader, 0), 6)
        for _epoch, (images, targets, _skipped) in batches:
            assert images.shape == (4, 3, SIZE, SIZE)
            for t in targets:
                counts[t["labels"][t["labels"] >= 0].unique()] += 1
        delivered[sampler] = counts.tolist()
    assert delivered == {"random": [20, 4], "class_balanced": [12, 12]}


def test_evaluate_checkpoint_with_oid_metric_and_submission(oid, balanced_run, tmp_path):
    checkpoint = os.path.join(balanced_run["run_dir"], "model_000006.pth")
    submission = str(tmp_path / "bin_0.csv")
    argv = [
        "--checkpoint", checkpoint, "--data_root", oid["data_root"], "--dataset", "openimages",
        "--val_sets", "validation", "--metric", "oid", "--save_path", str(tmp_path),
        "--submission", submission, "-j", "0", "--device", "cpu",
        # Six iterations leave every score near zero: keep the top 5 per image whatever their score.
        "--conf_thresh", "0", "--topk", "5",
    ]  # fmt: skip
    summary = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    headline = summary[checkpoint]
    assert 0.0 <= headline["oid_map"] <= 1.0
    with open(tmp_path / "detections_model_000006_openimages_validation.json") as f:
        detections = json.load(f)
    assert len(detections) == 8 * 5 and {d["category_id"] for d in detections} <= {1, 2}

    # One row per validation image, in the annotation file's order, MIDs of the trained subset only.
    with open(os.path.join(oid["root"], "annotations", "validation.json")) as f:
        gt = json.load(f)
    predictions = read_oid_submission(submission)
    assert list(predictions) == [im["oid_image_id"] for im in gt["images"]]
    assert {p[0] for preds in predictions.values() for p in preds} <= {"/m/apple", "/m/banana"}
    assert sum(len(p) for p in predictions.values()) == len(detections)
    # Round trip: back to pixels, the detections as evaluate.py wrote them (scores to 6 digits, boxes
    # to 1e-6 of 64 px, both after clipping to the image).
    back = oid_submission_to_coco_results(predictions, gt)
    key = lambda d: (d["image_id"], d["category_id"], -d["score"])  # noqa: E731
    for a, b in zip(sorted(detections, key=key), sorted(back, key=key)):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
        x, y, w, h = a["bbox"]
        clipped = np.clip([x, y, x + w, y + h], 0, SIZE)
        bx, by, bw, bh = b["bbox"]
        np.testing.assert_allclose([bx, by, bx + bw, by + bh], clipped, atol=1e-4)


def hand_made_detections():
    """COCO results for the validation split: every box found at score 0.9, plus one false positive (a
    Banana on v4, where Banana is verified absent) at 0.95 and one unverified detection (a Cherry on v0,
    which has neither a Cherry box nor a Cherry label) at 0.99."""
    detections = []
    for i, (_key, boxes, _present, _absent) in enumerate(val_layout()):
        for cls, (x1, y1, x2, y2), _group_of in boxes:
            detections.append(
                {
                    "image_id": 8192 + i,
                    "category_id": CATEGORY_ID[cls],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": 0.9,
                }
            )
    detections.append({"image_id": 8192 + 4, "category_id": 2, "bbox": [4, 4, 24, 24], "score": 0.95})
    detections.append({"image_id": 8192 + 0, "category_id": 3, "bbox": [40, 40, 16, 16], "score": 0.99})
    return detections


def test_bin_submissions_merge_and_score_by_hand(oid, tmp_path):
    """Two class-bin submissions, merged with merge_submissions.py, scored by evaluate.py.

    Hand-computed AP (all-point), with the hierarchy expanding the ground truth to Fruit:
      Apple   4 boxes, 4 TP                                                 -> 1
      Banana  4 boxes (1 group-of, hit by IoA 1); the FP at 0.95 ranks first -> 4 / 5 = 0.8
      Cherry  1 box, 1 TP; the v0 detection is ignored (not verified there)  -> 1
      Fruit   1 own box + 4 + 4 + 1 expanded = 10 boxes, 1 TP (the Fruit box; detections are not
              expanded)                                                      -> 1 / 10 = 0.1
      mAP = (1 + 0.8 + 1 + 0.1) / 4 = 0.725
    Scored as the bin_1 model's subset (--classes bin_1.txt) Fruit must still count the boxes of Apple,
    Banana and Cherry (expanded before the subset is kept): Cherry 1, Fruit 0.1, mAP 0.55.
    """
    with open(os.path.join(oid["root"], "annotations", "validation.json")) as f:
        gt = json.load(f)
    detections = hand_made_detections()
    bins = {"bin_0": {1, 2}, "bin_1": {3, 4}}
    csvs = {}
    for name, category_ids in bins.items():
        csvs[name] = str(tmp_path / f"{name}.csv")
        assert (
            write_oid_submission([d for d in detections if d["category_id"] in category_ids], gt, csvs[name])
            == 8
        )
    merged = str(tmp_path / "merged.csv")
    stats = merge_submissions.main(
        merge_submissions.get_args_parser().parse_args(
            ["--inputs", csvs["bin_0"], csvs["bin_1"], "--output", merged]
        )
    )
    assert (stats["num_images"], stats["num_predictions"]) == (8, len(detections)) == (8, 12)
    # Per image: bin_0's predictions, then bin_1's.
    predictions = read_oid_submission(merged)
    assert [p[0] for p in predictions[image_key("validation", 3)]] == ["/m/apple", "/m/cherry"]

    def score(submission, *extra):
        argv = [
            "--detections", submission, "--data_root", oid["data_root"], "--dataset", "openimages",
            "--val_sets", "validation", "--metric", "oid", *extra,
        ]  # fmt: skip
        return evaluate.main(evaluate.get_args_parser().parse_args(argv))["metrics"]["oid"]

    result = score(merged)
    assert result["ap"] == pytest.approx({"Apple": 1.0, "Banana": 0.8, "Cherry": 1.0, "Fruit": 0.1})
    assert result["map"] == pytest.approx(0.725)
    assert result["num_gt"] == {"Apple": 4, "Banana": 4, "Cherry": 1, "Fruit": 10}
    assert result["num_gt_group_of"] == {"Apple": 0, "Banana": 1, "Cherry": 0, "Fruit": 1}
    assert result["num_fp"]["Banana"] == 1 and result["num_ignored_unverified"]["Cherry"] == 1

    subset = score(csvs["bin_1"], "--classes", oid["bin_1"])
    assert subset["class_names"] == ["Cherry", "Fruit"]
    assert subset["ap"] == pytest.approx({"Cherry": 1.0, "Fruit": 0.1})
    assert subset["num_gt"] == {"Cherry": 1, "Fruit": 10}
    subset = score(csvs["bin_0"], "--classes", oid["bin_0"])
    assert subset["ap"] == pytest.approx({"Apple": 1.0, "Banana": 0.8}) and subset["map"] == pytest.approx(
        0.9
    )

    # --group_of_weight reaches the metric, and --save_path writes the metrics file of a submission.
    weighted = score(merged, "--group_of_weight", "0.5", "--save_path", str(tmp_path / "out"), "--plot")
    assert (tmp_path / "out" / "pr_merged.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="--plot with --detections needs --save_path"):
        score(merged, "--plot")
    assert weighted["group_of_weight"] == 0.5
    assert weighted["num_positives"]["Banana"] == 3.5 and weighted["num_positives"]["Fruit"] == 9.5
    assert (
        weighted["ap"]["Apple"] == result["ap"]["Apple"]
        and weighted["ap"]["Cherry"] == result["ap"]["Cherry"]
    )
    saved = json.load(open(tmp_path / "out" / "metrics_merged.json"))
    assert saved["oid_map"] == pytest.approx(weighted["map"]) and saved["oid"]["group_of_weight"] == 0.5
    assert saved["oid"]["ap"] == pytest.approx(weighted["ap"])
