"""Overlay renderer: words drawn where their boxes and points are, in their colors, on any image size."""

import numpy as np
import pytest

from pixelllm.predictor import Caption, Localization, Word
from pixelllm.visualize import render_overlay, word_colors


@pytest.mark.parametrize("size", [(40, 30), (900, 120), (60, 700), (640, 480)])
def test_words_are_drawn_in_their_colors_at_their_boxes(size):
    w, h = size
    image = np.full((h, w, 3), 128, np.uint8)
    box = (w * 0.2, h * 0.3, w * 0.6, h * 0.7)
    words = [
        Word("red", 2, 5, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), box, 0.9),
        Word("star", 6, 10, (w * 0.9, h * 0.9), (w * 0.7, h * 0.75, w * 0.95, h * 0.95), 0.8),
    ]
    out = np.asarray(render_overlay(image, Caption("a red star.", words)))
    assert out.shape[1] == w and out.shape[0] > h  # the caption band is below the image
    for word, color in zip(words, word_colors(2)):
        x0, y0, x1, _ = (int(v) for v in word.box)
        assert (out[y0, x0 + 1 : x1 - 1] == color).all(axis=1).mean() > 0.8, word.text  # top edge of its box
        cx, cy = (int(v) for v in word.point)
        assert (out[cy, cx] == color).all(), word.text  # its point marker
    assert (out[:h][out[:h].sum(axis=2) != 3 * 128]).size > 0


def test_localization_mask_is_blended_and_box_drawn():
    image = np.full((100, 200, 3), 100, np.uint8)
    mask = np.zeros((100, 200), bool)
    mask[10:40, 10:60] = True
    loc = Localization("the circle", (100, 50, 180, 90), 0.7, [], mask)
    out = np.asarray(render_overlay(image, loc))
    assert not (out[20, 20] == 100).all()  # tinted inside the mask
    assert (out[70, 20] == 100).all()  # untouched outside
    assert (out[50, 120] == 255).all()  # the box outline in white


def test_a_reduced_decode_is_drawn_on_in_its_files_pixels():
    """`decode` may give a JPEG at reduced scale; results are in the file's pixels, and so is the drawing."""
    import io

    from PIL import Image

    from pixelllm.transforms import decode

    buffer = io.BytesIO()
    Image.fromarray(np.full((600, 800, 3), 90, np.uint8)).save(buffer, "JPEG")
    decoded = decode(Image.open(buffer), image_size=100)
    assert decoded.image.size == (100, 75) and (decoded.width, decoded.height) == (800, 600)
    loc = Localization("the circle", (400, 300, 700, 500), 0.7, [], None)
    out = np.asarray(render_overlay(decoded, loc))
    assert out.shape[1] == 800 and out.shape[0] > 600
    assert (out[400, 400] == 255).all() and not (out[200, 200] == 255).all()  # the box's left edge, at file pixels
