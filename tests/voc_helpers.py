"""Pascal VOC XML files, images and a fake VOCdevkit for tests/test_prep_voc.py and
tests/test_prep_voc_checks.py."""

import os

import cv2
import numpy as np

from prep import voc


def _write_image(path, width, height):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 128, np.uint8))


def _obj(name, box, difficult="0"):
    xmin, ymin, xmax, ymax = box
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return (
        f"<object><name>{name}</name><pose>Left</pose>{diff}"
        f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def _xml(filename, size, objects):
    size_xml = (
        ""
        if size is None
        else f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    )
    name_xml = "" if filename is None else f"<filename>{filename}</filename>"
    return f"<annotation><folder>x</folder>{name_xml}{size_xml}{''.join(objects)}</annotation>"


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _folder_argv(xml_dir, image_dir, dataset, data_root):
    """prep/voc.py's folder-mode options."""
    return [
        "--xml_dir",
        str(xml_dir),
        "--image_dir",
        str(image_dir),
        "--dataset",
        dataset,
        "--data_root",
        str(data_root),
    ]


def _args(*argv):
    return voc.get_args_parser().parse_args(list(argv))


def _fake_devkit(root):
    """VOCdevkit/VOC2007 with trainval (000005, 000007, 000008 without XML) and test (000009),
    VOC2012 with trainval (2008_000002)."""
    v07, v12 = root / "VOC2007", root / "VOC2012"
    _write(v07 / "ImageSets" / "Main" / "trainval.txt", "000005\n000007\n000008\n")
    _write(v07 / "ImageSets" / "Main" / "test.txt", "000009\n")
    _write(v12 / "ImageSets" / "Main" / "trainval.txt", "2008_000002\n")
    for year_dir, name, size, objects in [
        (v07, "000005", (50, 40), [_obj("chair", (12, 5, 30, 40)), _obj("chair", (1, 20, 8, 35), "1")]),
        (v07, "000007", (30, 20), [_obj("car", (2, 3, 30, 20))]),
        (v07, "000009", (30, 20), [_obj("horse", (3, 4, 25, 19)), _obj("person", (1, 1, 6, 12))]),
        (v12, "2008_000002", (25, 30), [_obj("tvmonitor", (5, 8, 24, 28))]),
    ]:
        _write(year_dir / "Annotations" / f"{name}.xml", _xml(f"{name}.jpg", size, objects))
        _write_image(year_dir / "JPEGImages" / f"{name}.jpg", *size)
    _write(v07 / "Annotations" / "000008.jpg", "")  # an image without its XML
    return str(root)
