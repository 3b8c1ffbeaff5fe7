"""A small Open Images ground truth for tests/test_oid_eval.py and tests/test_oid_eval_reference.py:
Entity (root, skipped) -> Animal -> Mammal -> Dog; Entity -> Car, and builders of images, boxes and
detections in the common format."""

# Entity (root, skipped) -> Animal -> Mammal -> Dog; Entity -> Car.
HIERARCHY = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {"LabelName": "/m/a", "Subcategory": [{"LabelName": "/m/m", "Subcategory": [{"LabelName": "/m/d"}]}]},
        {"LabelName": "/m/c", "Part": [{"LabelName": "/m/wheel"}]},
    ],
}


CATEGORIES = [
    {"id": 1, "name": "Animal", "mid": "/m/a"},
    {"id": 2, "name": "Mammal", "mid": "/m/m"},
    {"id": 3, "name": "Dog", "mid": "/m/d"},
    {"id": 4, "name": "Car", "mid": "/m/c"},
]


def image(i, present=(), absent=(), **extra):
    return {
        "id": i,
        "file_name": f"validation/img{i}.jpg",
        "width": 400,
        "height": 400,
        "verified_present": list(present),
        "verified_absent": list(absent),
        **extra,
    }


def box(img, cat, xywh, group_of=0):
    return {"image_id": img, "category_id": cat, "bbox": [float(v) for v in xywh], "iscrowd": group_of}


def make_gt(images, boxes):
    anns = [
        {"id": i + 1, "area": b["bbox"][2] * b["bbox"][3], "difficult": 0, **b} for i, b in enumerate(boxes)
    ]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def det(img, cat, xywh, score):
    return {"image_id": img, "category_id": cat, "bbox": [float(v) for v in xywh], "score": score}
