"""Evaluation metrics with known answers."""

import numpy as np
import pytest

from pixelllm.evaluate import _color_shape, box_iou, mask_iou


def test_box_iou_known_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_mask_iou_known_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0


def test_color_and_shape_are_read_from_a_region_caption():
    assert _color_shape("a small green star.") == ("green", "star")
    assert _color_shape("a large thing") == (None, None)
