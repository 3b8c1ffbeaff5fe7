import cv2
import numpy as np

from demo import class_colour, draw_detections


def _caption_band(canvas, colour, row):
    """Columns of ``row`` painted in exactly ``colour`` (the caption's filled background)."""
    return np.flatnonzero((canvas[row] == np.array(colour, dtype=np.uint8)).all(axis=1))


def test_boxes_and_captions_are_drawn_inside_the_image():
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 40.0, 50.0, 90.0], [100.0, 70.0, 120.0, 95.0]])
    canvas = draw_detections(
        image, boxes, np.array([0.9, 0.95]), np.array([0, 2]), ["circle", "sq", "triangle"]
    )
    assert canvas.shape == (100, 120, 3)
    (tw0, th0), baseline0 = cv2.getTextSize("circle 0.90", cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    (tw, th), baseline = cv2.getTextSize("triangle 0.95", cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    assert tw > 20  # wider than the box at the right edge, so it must be shifted left
    # Box 1: its outline in its class colour, caption band starting at its left edge above y1 = 40.
    colour0 = class_colour(0)
    assert (canvas[40, 10:51] == colour0).all() and (canvas[40:91, 10] == colour0).all()
    band0 = _caption_band(canvas, colour0, 40 - th0 - baseline0)
    assert band0.min() == 10 and band0.max() == 10 + tw0
    # Box 2 touches the right edge: its whole caption is shifted left to end at the last column.
    band2 = _caption_band(canvas, class_colour(2), 70 - th - baseline)
    assert band2.min() == 120 - tw and band2.max() == 119
