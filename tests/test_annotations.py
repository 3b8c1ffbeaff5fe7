import copy
import json
import math
import os

import pytest

from data.annotations import (
    BOX_TOLERANCE,
    load_annotations,
    save_annotations,
    validate_annotations,
)


def _valid():
    return {
        "images": [
            {"id": 1, "file_name": "images/a.jpg", "width": 100, "height": 50},
            {"id": 2, "file_name": "images/b.jpg", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [0, 0, 100, 50], "area": 5000, "iscrowd": 0},
            {
                "id": 11,
                "image_id": 2,
                "category_id": 7,
                "bbox": [1.5, 2.5, 10.0, 5.0],
                "area": 50.0,
                "iscrowd": 1,
                "difficult": 1,
            },
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


def _problems(mutate):
    coco = _valid()
    mutate(coco)
    return validate_annotations(coco, "split.json")


def test_valid_file_has_no_problems():
    assert validate_annotations(_valid(), "x.json") == []


def test_empty_sections_are_valid():
    assert validate_annotations({"images": [], "annotations": [], "categories": []}, "x.json") == []


def test_box_within_tolerance_is_accepted_and_beyond_is_not():
    def poke(amount):
        def mutate(coco):
            coco["annotations"][0]["bbox"] = [-amount, 0, 100 + 2 * amount, 50]

        return mutate

    assert _problems(poke(BOX_TOLERANCE * 0.9)) == []
    problems = _problems(poke(BOX_TOLERANCE + 0.5))
    assert len(problems) == 1
    assert "annotation id=10" in problems[0] and "outside image id=1" in problems[0]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["annotations"][0].update(image_id=99), ["annotation id=10: unknown image_id 99"]),
        (lambda c: c["annotations"][1].update(category_id=5), ["annotation id=11: unknown category_id 5"]),
        (lambda c: c["images"][1].update(id=1), ["image id=1: duplicate id"]),
        (lambda c: c["annotations"][1].update(id=10), ["annotation id=10: duplicate id"]),
        (lambda c: c["categories"][1].update(id=7), ["category id=7: duplicate id"]),
        (lambda c: c["images"][0].pop("width"), ["image id=1: missing required field(s) width"]),
        (
            lambda c: [c["annotations"][1].pop(k) for k in ("area", "iscrowd")],
            ["annotation id=11: missing required field(s) area, iscrowd"],
        ),
        (lambda c: c["categories"][0].pop("name"), ["category id=7: missing required field(s) name"]),
        (lambda c: c["annotations"][0].pop("id"), ["annotations[0]: missing required field(s) id"]),
        (lambda c: c["images"][0].update(width=-100), ["image id=1: width must be a finite number > 0"]),
        (
            lambda c: c["images"][0].update(height=math.nan),
            ["image id=1: height must be a finite number > 0"],
        ),
        (lambda c: c["images"][0].update(height=0), ["image id=1: height must be a finite number > 0"]),
        (
            lambda c: c["annotations"][1].update(bbox=[1, 1, -2, 3]),
            ["annotation id=11: bbox has negative width or height"],
        ),
        (
            lambda c: c["annotations"][1].update(bbox=[1, 1, math.inf, 3]),
            ["annotation id=11: bbox has non-finite values"],
        ),
        (lambda c: c["annotations"][1].update(bbox=[1, 1, 3]), ["annotation id=11: bbox must be 4 numbers"]),
        (
            lambda c: c["annotations"][1].update(bbox=[1, 1, "3", 3]),
            ["annotation id=11: bbox must be 4 numbers"],
        ),
        (
            lambda c: c["annotations"][1].update(bbox=[30, 0, 12, 5]),
            ["annotation id=11: bbox [30, 0, 12, 5] lies outside image id=2 (40 x 30)"],
        ),
        (
            lambda c: c["annotations"][1].update(area=-1),
            ["annotation id=11: area must be a finite number >= 0"],
        ),
        (lambda c: c["annotations"][1].update(iscrowd=2), ["annotation id=11: iscrowd must be 0 or 1"]),
        (lambda c: c["annotations"][1].update(difficult=-1), ["annotation id=11: difficult must be 0 or 1"]),
        (lambda c: c["images"][0].update(id="1"), ["images[0]: id must be an integer, got '1'"]),
        (lambda c: c["images"][0].update(file_name="/abs/a.jpg"), ["image id=1: file_name must be relative"]),
        (
            lambda c: c["images"][1].update(file_name="images/a.jpg"),
            ["image file 'images/a.jpg' is listed 2 times (image ids 1, 2): merge them"],
        ),
        (
            lambda c: c["images"][1].update(file_name="images//./a.jpg"),  # the same file, spelt otherwise
            ["image file 'images/a.jpg' is listed 2 times (image ids 1, 2)"],
        ),
        (lambda c: c.pop("categories"), ["missing or non-list top-level field 'categories'"]),
        (lambda c: c["annotations"].append(5), ["annotations[2]: expected an object, got int"]),
    ],
)
def test_each_problem_kind_is_reported_with_file_and_record(mutate, expected):
    problems = _problems(mutate)
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert all(p.startswith("split.json: ") for p in problems)


def test_unknown_category_from_popped_categories_is_also_reported():
    # Every problem is listed, not only the first: without categories both boxes lose their class.
    problems = _problems(lambda c: c.update(categories=[]))
    assert sorted(p for p in problems if "unknown category_id" in p) == [
        "split.json: annotation id=10: unknown category_id 3",
        "split.json: annotation id=11: unknown category_id 7",
    ]


def test_load_names_file_and_bad_record_ids(tmp_path):
    coco = _valid()
    coco["annotations"][0]["image_id"] = 42
    coco["annotations"][1]["bbox"] = [0, 0, -1, 1]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError) as err:
        load_annotations(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: 2 problem(s)")
    assert "annotation id=10: unknown image_id 42" in message
    assert "annotation id=11: bbox has negative width or height" in message


def test_load_caps_the_listing(tmp_path):
    coco = _valid()
    coco["annotations"] = [
        {"id": i, "image_id": 1000 + i, "category_id": 3, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
        for i in range(25)
    ]
    path = tmp_path / "many.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError) as err:
        load_annotations(str(path))
    message = str(err.value)
    assert "25 problem(s)" in message
    assert message.count("unknown image_id") == 20
    assert message.endswith("... and 5 more")


def test_load_missing_file_and_invalid_json(tmp_path):
    with pytest.raises(ValueError, match="nope.json: annotation file not found"):
        load_annotations(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json: not a valid JSON"):
        load_annotations(str(broken))
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: expected a JSON object"):
        load_annotations(str(not_object))


def test_save_round_trips_creates_folders_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "voc" / "annotations" / "train.json"
    save_annotations(_valid(), str(path))
    assert load_annotations(str(path)) == _valid()
    assert os.listdir(path.parent) == ["train.json"]
    # Overwriting replaces the file as a whole.
    smaller = copy.deepcopy(_valid())
    smaller["annotations"] = []
    save_annotations(smaller, str(path))
    assert load_annotations(str(path))["annotations"] == []


def test_save_refuses_invalid_and_keeps_previous_file(tmp_path):
    path = tmp_path / "train.json"
    save_annotations(_valid(), str(path))
    bad = _valid()
    bad["annotations"][0]["category_id"] = 99
    with pytest.raises(ValueError, match="annotation id=10: unknown category_id 99"):
        save_annotations(bad, str(path))
    assert load_annotations(str(path)) == _valid()
    # NaN in a field the validator does not look at: json refuses it, the message names the file.
    odd = _valid()
    odd["images"][0]["score"] = math.nan
    with pytest.raises(ValueError, match="train.json: cannot write"):
        save_annotations(odd, str(path))
    assert load_annotations(str(path)) == _valid()
    assert os.listdir(tmp_path) == ["train.json"]


def test_valid_files_take_the_vectorised_path():
    # The per-record checks are the fallback that names problems; a valid file must be accepted by
    # the fast all-or-nothing check, or loading Open Images would take minutes.
    from data.annotations import _looks_valid

    coco = _valid()
    assert _looks_valid(coco["images"], coco["annotations"], coco["categories"])
    assert _looks_valid([], [], [])


def test_an_image_file_listed_twice_is_not_valid_on_the_fast_path():
    from data.annotations import _looks_valid

    coco = _valid()
    coco["images"][1]["file_name"] = "images/a.jpg"
    assert not _looks_valid(coco["images"], coco["annotations"], coco["categories"])
    coco["images"][1]["file_name"] = "images/./a.jpg"
    assert not _looks_valid(coco["images"], coco["annotations"], coco["categories"])
    coco["images"][1]["file_name"] = "images/a.jpg.jpg"  # another file
    assert _looks_valid(coco["images"], coco["annotations"], coco["categories"])


@pytest.mark.parametrize("name", [None, "", "  ", 7])
def test_category_names_must_be_non_empty_strings(name):
    from data.annotations import _looks_valid

    coco = _valid()
    coco["categories"][0]["name"] = name
    assert not _looks_valid(coco["images"], coco["annotations"], coco["categories"])
    assert validate_annotations(coco, "split.json") == [
        f"split.json: category id=7: name must be a non-empty string, got {name!r}"
    ]


def test_an_unreadable_annotation_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "train.json"
    path.write_text("{}")
    real_open = open

    def no_permission(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_permission)
    with pytest.raises(ValueError, match="train.json: cannot read the annotation file: Permission denied"):
        load_annotations(str(path))
