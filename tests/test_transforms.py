"""Image conversion: one rule for the Python API, the CLI and the service."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm.cli import _load_image
from pixelllm.transforms import preprocess, to_rgb, to_rgb_array
from server.images import decode_image


def half_transparent() -> Image.Image:
    """A red left half, a fully transparent (black underneath) right half."""
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)
    return Image.fromarray(rgba, "RGBA")


def sixteen_bit() -> Image.Image:
    return Image.fromarray(np.linspace(0, 65535, 32 * 24).reshape(24, 32).astype(np.uint16))


def test_transparency_goes_onto_white_and_16_bit_is_scaled() -> None:
    rgb = to_rgb_array(half_transparent())
    assert tuple(rgb[5, 5]) == (255, 0, 0) and tuple(rgb[5, 25]) == (255, 255, 255)
    grey = to_rgb_array(sixteen_bit())
    assert grey[0, 0, 0] == 0 and grey[-1, -1, 0] == 255
    assert 120 <= grey[12, 16, 0] <= 135  # mid-gradient stays mid-grey (a plain convert clips it to white)
    assert to_rgb(Image.new("RGB", (4, 4), (1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("make", [half_transparent, sixteen_bit], ids=["rgba", "16-bit"])
def test_python_api_cli_and_service_feed_the_model_the_same_pixels(tmp_path, make) -> None:
    path = tmp_path / "image.png"
    make().save(path)
    data = path.read_bytes()
    api, _ = preprocess(Image.open(path), 64)
    cli, _ = preprocess(_load_image(str(path)), 64)
    service, _ = preprocess(decode_image(data, 10**6, 100), 64)
    assert torch.equal(api, cli) and torch.equal(api, service)
    with Image.open(io.BytesIO(data)) as im:
        assert not torch.equal(api, preprocess(im.convert("RGB"), 64)[0])  # the rule changes what the model sees
