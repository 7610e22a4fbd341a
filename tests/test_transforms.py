"""Image conversion: one rule for the Python API, the CLI and the service."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from server_helpers import exif_after_pixels, exif_turned

from pixelllm.cli import _load_image
from pixelllm.transforms import ImageTransform, decode, orientation, preprocess, to_rgb, to_rgb_array
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


def test_float_images_keep_their_exposure_and_empty_images_are_refused() -> None:
    dark = np.array([[0.0, 0.1, 0.25]], dtype=np.float32)  # a dark image in [0, 1] stays dark
    assert to_rgb_array(Image.fromarray(dark, "F"))[0, :, 0].tolist() == [0, 25, 63]
    wide = np.array([[0.0, 100.0, 300.0]], dtype=np.float32)  # values past 1: read as [0, 255], clipped
    assert to_rgb_array(Image.fromarray(wide, "F"))[0, :, 0].tolist() == [0, 100, 255]
    for empty in (Image.new("RGB", (0, 5)), np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(ValueError, match="image is empty"):
            to_rgb_array(empty)


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


def photo(width: int, height: int, orientation: int = 1) -> bytes:
    """A smooth photo-like JPEG: a colour gradient with a dark disc; `orientation` its EXIF orientation tag."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, 1 - x], axis=-1) * 255
    rgb[(x - 0.3) ** 2 + (y - 0.25) ** 2 < 0.01] = 20
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("image_size, decoded_size", [(160, (200, 150)), (512, (800, 600)), (1024, (1600, 1200))])
def test_decode_reads_a_large_jpeg_at_the_smallest_scale_above_the_model_input(image_size, decoded_size) -> None:
    data = photo(1600, 1200)
    decoded = decode(Image.open(io.BytesIO(data)), image_size)
    assert decoded.image.size == decoded_size and (decoded.height, decoded.width) == (1200, 1600)
    full = decode(Image.open(io.BytesIO(data)))
    assert full.image.size == (1600, 1200) and (full.height, full.width) == (1200, 1600)
    reduced_input, reduced_transform = preprocess(decoded, image_size)
    full_input, full_transform = preprocess(full, image_size)
    assert reduced_transform == full_transform == ImageTransform(1200, 1600, image_size)
    assert (reduced_input - full_input).abs().mean() < 0.0015  # the same picture resampled (1 px off: 0.0016+)
    assert (reduced_input[:, 3 * image_size // 4 :] == 0).all()  # padded below the 4:3 image, as from a full decode


def test_decode_swaps_the_sides_of_a_quarter_turned_jpeg_and_leaves_png_whole() -> None:
    decoded = decode(Image.open(io.BytesIO(photo(1600, 1200, orientation=6))), 160)
    assert decoded.image.size == (150, 200) and (decoded.height, decoded.width) == (1600, 1200)
    full = decode(Image.open(io.BytesIO(photo(1600, 1200, orientation=6))))
    assert (preprocess(decoded, 160)[0] - preprocess(full, 160)[0]).abs().mean() < 0.0015
    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200)).save(buf, "PNG")
    assert decode(Image.open(buf), 160).image.size == (1600, 1200)  # only JPEG decodes at reduced scale


@pytest.mark.parametrize(("fmt", "tag", "shown"), [("PNG", 6, 6), ("JPEG", 8, 8), ("WEBP", 6, 1), ("PNG", 9, 1)])
def test_orientation_follows_the_browsers(fmt: str, tag: int, shown: int) -> None:
    """A PNG's or JPEG's EXIF orientation turns the image, a WebP's does not (Chromium's rule), an invalid tag
    is ignored; `to_rgb_array` (the Python API's way in) and `decode` turn alike."""
    exif = Image.Exif()
    exif[0x0112] = tag
    buf = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buf, fmt, exif=exif.tobytes())
    quarter = shown in (5, 6, 7, 8)
    for read in (lambda im: to_rgb_array(im).shape[1::-1], lambda im: decode(im).image.size):
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            assert orientation(im) == shown
            assert read(im) == ((20, 40) if quarter else (40, 20))


def test_a_tagged_webp_reaches_the_model_as_stored() -> None:
    """A WebP's EXIF tag turns nothing on any way in: the model input of a tagged WebP is the untagged one's."""
    halves = np.zeros((20, 60, 3), np.uint8)
    halves[:, 30:] = (0, 0, 255)  # left black, right blue
    files = []
    for tag in (6, None):
        exif = Image.Exif()
        if tag:
            exif[0x0112] = tag
        buf = io.BytesIO()
        Image.fromarray(halves).save(buf, "WEBP", lossless=True, exif=exif.tobytes())
        files.append(buf.getvalue())
    inputs = [preprocess(decode(Image.open(io.BytesIO(data)), 160), 160)[0] for data in files]
    inputs += [preprocess(decode_image(files[0], 10**6, 100, 160), 160)[0]]
    inputs += [preprocess(Image.open(io.BytesIO(files[0])), 160)[0]]
    assert inputs[0][2, 5, 100] > 0.9  # blue on the right
    for other in inputs[1:]:
        torch.testing.assert_close(other, inputs[0])


def test_an_orientation_given_only_in_xmp_turns_nothing() -> None:
    """Browsers read the EXIF block's tag only; an XMP `tiff:Orientation` (which Pillow's getexif reads) is left."""
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    buf = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buf, "JPEG", xmp=xmp)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.getexif().get(0x0112) == 6  # Pillow's reading
        assert orientation(im) == 1 and decode(im).image.size == (40, 20)


def test_mean_padding_is_what_sam_pads_with() -> None:
    """segment_anything normalizes, then pads with 0 (`Sam.preprocess`), as the paper's code does: "mean" padding
    is 0 once normalized, where "black" is about -2 standard deviations."""
    from conftest import peer_sam

    from pixelllm.config import load_config
    from pixelllm.modeling.image_encoder import SAM_PIXEL_MEAN, SAM_PIXEL_STD

    size = 64
    image = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)  # 2:1, bottom half padded
    theirs = peer_sam(load_config("pixelllm-tiny"), size).preprocess(
        torch.from_numpy(image).permute(2, 0, 1)[None] * 1.0
    )
    mean, std = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1), torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    ours = {padding: (preprocess(image, size, padding)[0] - mean) / std for padding in ("mean", "black")}
    torch.testing.assert_close(ours["mean"][:, 32:], theirs[0, :, 32:], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["mean"][:, :32], ours["black"][:, :32])  # the image itself is the same
    assert (ours["black"][:, 32:] < -1.7).all()
    with pytest.raises(ValueError, match="padding is 'grey': it must be one of black, mean"):
        preprocess(image, size, "grey")


def jpeg_with_app1(payload: bytes) -> bytes:
    """A 40 x 30 JPEG whose APP1 segment (the EXIF block) is `payload`, as given."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def tagged_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Camera"  # Make, ASCII
    return exif.tobytes()


@pytest.mark.parametrize("turn", range(1, 9))
def test_each_orientation_turns_as_pillow_turns_it(turn: int) -> None:
    """`upright`'s table is Pillow's: the pixels come out as `ImageOps.exif_transpose` turns them."""
    from PIL import ImageOps

    pixels = np.random.default_rng(turn).integers(0, 255, (6, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", exif=tagged_exif(turn))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert orientation(im) == turn
        np.testing.assert_array_equal(to_rgb_array(im), np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
        assert orientation(decode(im).image) == 1  # turned once, not again


def test_a_damaged_exif_block_is_read_as_browsers_read_it() -> None:
    """An EXIF block Pillow cannot parse says orientation 1 (browsers show such a photo as stored); one whose
    orientation reads but another tag is damaged (here Make retagged as ImageWidth, ASCII where numbers belong)
    still turns the image. Both are answered on every way in: before, the service said 422 and the API raised."""
    unreadable = jpeg_with_app1(b"Exif\x00\x00" + b"X" * 16)
    exif = tagged_exif(6)
    assert exif.startswith(b"Exif\x00\x00")  # Pillow's block, as a JPEG's APP1 holds it
    order = "big" if exif[6:8] == b"MM" else "little"
    make, width = (0x010F).to_bytes(2, order), (0x0100).to_bytes(2, order)
    assert exif.count(make) == 1
    damaged = jpeg_with_app1(exif.replace(make, width))
    for data, size in ((unreadable, (40, 30)), (damaged, (30, 40))):
        with Image.open(io.BytesIO(data)) as im:
            assert to_rgb_array(im).shape[1::-1] == size
            assert decode(im).image.size == size
        assert decode_image(data, 10**6, 100, 160).image.size == size


def test_a_png_exif_block_after_the_pixels_turns_nothing(tmp_path) -> None:
    """Browsers read a PNG's EXIF only before the pixel data (tests/test_server_browser.py checks Chromium), so one
    after it turns the image on no way in (loading first used to find it for the CLI and the service only)."""
    late = tmp_path / "late.png"
    late.write_bytes(exif_after_pixels(exif_turned("PNG")))
    with Image.open(late) as im:
        assert to_rgb_array(im).shape[1::-1] == (160, 80)
    assert _load_image(str(late)).image.size == (160, 80)
    assert decode_image(late.read_bytes(), 10**6, 100, 160).image.size == (160, 80)
