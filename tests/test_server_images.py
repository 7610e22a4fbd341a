"""A corpus of malformed and unusual images, generated here, sent to the real service."""

from __future__ import annotations

import io
import math
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from server_helpers import assert_error, encode, exif_turned, png, random_image

from pixelllm.data.synthetic import generate_scene
from pixelllm.evaluate import box_iou
from server.errors import ApiError
from server.images import decode_image

pytest_plugins = ["server_fixtures"]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds (almost) no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def animated_gif() -> tuple[bytes, bytes]:
    """A two-frame GIF, and its first frame as PNG."""
    first = Image.new("RGB", (64, 48), (220, 30, 30))
    second = random_image(64, 48, seed=5)
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return gif, encode(Image.open(io.BytesIO(gif)).convert("RGB"))


def sixteen_bit_png() -> bytes:
    gradient = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    return encode(Image.fromarray(gradient))


JPEG = encode(random_image(128, 96, seed=2), "JPEG", quality=90)
PNG = png(128, 96, seed=2)
GIF, GIF_FIRST_FRAME = animated_gif()

REFUSED = {
    "empty": (b"", 422, "invalid_image"),
    "truncated-jpeg": (JPEG[: len(JPEG) // 2], 422, "invalid_image"),
    "truncated-png": (PNG[: len(PNG) // 2], 422, "invalid_image"),
    "png-bad-idat": (PNG[:60] + bytes(64) + PNG[124:], 422, "invalid_image"),
    "wrong-magic": (b"\x00\x00\x00\x00" + PNG[4:], 415, "unsupported_media_type"),
    "text": (b"hello, world", 415, "unsupported_media_type"),
    "tiff-not-allowed": (encode(random_image(32, 32, seed=3), "TIFF"), 415, "unsupported_media_type"),
    "1x100000": (encode(Image.new("RGB", (1, 100000))), 422, "invalid_image"),
    "bomb-header": (png_header(100_000, 100_000), 413, "image_too_large"),
    "over-pixel-budget": (encode(Image.new("RGB", (2500, 2000))), 413, "image_too_large"),
    "zero-width-header": (png_header(0, 10), 422, "invalid_image"),  # a PNG Pillow will not open: corrupt
    "png-damaged-header": (PNG[:20] + bytes([PNG[20] ^ 0xFF]) + PNG[21:], 422, "invalid_image"),  # IHDR's CRC fails
    "gif-cut-in-header": (GIF[:12], 422, "invalid_image"),
}

ACCEPTED = {
    "cmyk-jpeg": (encode(random_image(64, 48, seed=7, mode="CMYK"), "JPEG"), (64, 48)),
    "16-bit-png": (sixteen_bit_png(), (64, 48)),
    "rgba-png": (encode(random_image(64, 48, seed=8, mode="RGBA")), (64, 48)),
    "palette-transparent-png": (encode(random_image(64, 48, seed=9).convert("P"), transparency=0), (64, 48)),
    "grayscale-png": (encode(random_image(64, 48, seed=10, mode="L")), (64, 48)),
    "la-png": (encode(random_image(64, 48, seed=11, mode="LA")), (64, 48)),
    "animated-gif": (GIF, (64, 48)),
    "exif-rotated-jpeg": (exif_turned("JPEG"), (80, 160)),
    "exif-rotated-png": (exif_turned("PNG"), (80, 160)),
    "exif-rotated-webp": (exif_turned("WEBP"), (160, 80)),
    "bmp": (encode(random_image(40, 30, seed=12), "BMP"), (40, 30)),
    "webp": (encode(random_image(40, 30, seed=13), "WEBP"), (40, 30)),
    "1x50": (encode(Image.new("RGB", (1, 50), (9, 9, 9))), (1, 50)),
}


def caption(client: httpx.Client, data: bytes, **fields: str) -> httpx.Response:
    return client.post("/v1/caption", files={"image": ("upload", data)}, data={"max_new_tokens": "3", **fields})


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_images(service_client: httpx.Client, name: str) -> None:
    data, status, code = REFUSED[name]
    assert_error(caption(service_client, data), status, code)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_images(service_client: httpx.Client, name: str) -> None:
    data, (width, height) = ACCEPTED[name]
    r = caption(service_client, data)
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": width, "height": height}


def test_exif_rotation_applies_to_prompts(service_client: httpx.Client) -> None:
    """Boxes are in the rotated (viewed) frame: y up to 160 is inside, x beyond 80 is outside."""
    data = ACCEPTED["exif-rotated-jpeg"][0]
    assert caption(service_client, data, box="0,100,80,160").status_code == 200
    assert_error(caption(service_client, data, box="0,0,100,50"), 422, field="box")


def test_gif_uses_first_frame(service_client: httpx.Client) -> None:
    a = caption(service_client, GIF, box="0,0,40,40").json()
    b = caption(service_client, GIF_FIRST_FRAME, box="0,0,40,40").json()
    assert len(a["words"]) >= 2 and a["caption"] == b["caption"]

    def coords(body: dict) -> list[float]:
        return [v for w in body["words"] for v in w["box"].values()]

    assert coords(a) == pytest.approx(coords(b))


def test_decode_converts_modes() -> None:
    rgb = decode_image(sixteen_bit_png(), 10**6, 100).image
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((63, 47)) == (255, 255, 255)
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decode_image(encode(clear), 10**6, 100).image.getpixel((3, 3)) == (255, 255, 255)  # onto white
    cmyk = decode_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"), 10**6, 100).image
    assert cmyk.mode == "RGB" and min(cmyk.getpixel((3, 3))) > 240
    assert decode_image(exif_turned("JPEG"), 10**6, 100).image.size == (80, 160)
    assert decode_image(exif_turned("WEBP"), 10**6, 100).image.size == (160, 80)


QUADRANT_COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0), "white": (255, 255, 255)}
STORED = np.array([["red", "blue"], ["green", "white"]])  # the stored image's quadrants, top row first
# EXIF orientation -> how the viewer turns the stored image (the EXIF 2.3 table), as numpy does it to STORED
VIEWED = {
    1: lambda q: q,
    2: np.fliplr,
    3: lambda q: np.rot90(q, 2),
    4: np.flipud,
    5: lambda q: q.T,
    6: lambda q: np.rot90(q, -1),  # clockwise
    7: lambda q: np.rot90(q, 2).T,
    8: lambda q: np.rot90(q, 1),  # anticlockwise
}


def quadrants(orientation: int, fmt: str) -> bytes:
    """Stored 160x80 in four coloured quadrants (`STORED`), with this EXIF orientation."""
    image = Image.new("RGB", (160, 80))
    for (row, col), name in np.ndenumerate(STORED):
        image.paste(QUADRANT_COLOURS[name], (col * 80, row * 40, col * 80 + 80, row * 40 + 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def seen_quadrants(image: Image.Image) -> np.ndarray:
    """The colour names at the centres of the image's four quadrants, top row first."""
    w, h = image.size

    def name(xy: tuple[int, int]) -> str:
        pixel = np.array(image.getpixel(xy))
        return min(QUADRANT_COLOURS, key=lambda c: np.abs(pixel - QUADRANT_COLOURS[c]).sum())

    return np.array([[name((w // 4 + c * w // 2, h // 4 + r * h // 2)) for c in (0, 1)] for r in (0, 1)])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", list(VIEWED))
def test_decode_turns_the_way_the_exif_orientation_says(fmt: str, orientation: int) -> None:
    """Every orientation, mirrored ones included: a wrong turn or flip keeps the size but moves the colours."""
    image = decode_image(quadrants(orientation, fmt), 10**6, 100).image
    expected = VIEWED[orientation](STORED)
    assert image.size == ((160, 80) if orientation < 5 else (80, 160))
    assert seen_quadrants(image).tolist() == expected.tolist()


def test_decode_keeps_a_webp_as_stored_and_a_gif_first_frame() -> None:
    webp = decode_image(quadrants(6, "WEBP"), 10**6, 100).image
    assert webp.size == (160, 80) and seen_quadrants(webp).tolist() == STORED.tolist()
    frame = decode_image(GIF, 10**6, 100).image
    assert frame.size == (64, 48)
    assert {frame.getpixel((x, y)) for x in range(0, 64, 7) for y in range(0, 48, 7)} == {(220, 30, 30)}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_keeps_pillow_bomb_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ApiError) as err:
        decode_image(png(40, 30), 10**9, 100)  # 1200 pixels: over Pillow's limit though under ours
    assert err.value.status == 413


def test_a_large_jpeg_is_decoded_reduced_and_answered_in_its_own_pixels(trained_service) -> None:
    """A JPEG 8x the model input decodes at 1/8 scale: the shipped model finds the object as on the small
    original, in the large file's pixels."""
    scene = generate_scene(3)
    height, width = scene.image.shape[:2]
    k = math.ceil(8 * 288 / max(width, height))  # the shipped model's input side is 288
    large = encode(Image.fromarray(scene.image).resize((width * k, height * k), Image.BICUBIC), "JPEG", quality=95)
    obj = scene.objects[0]
    with httpx.Client(base_url=trained_service.url, timeout=60) as client:
        answers = [
            client.post("/v1/localize", files={"image": data}, data={"text": obj.referring})
            for data in (large, encode(Image.fromarray(scene.image)))
        ]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    large_body, small_body = (r.json() for r in answers)
    assert large_body["image"] == {"width": width * k, "height": height * k}
    large_box = [v / k for v in large_body["results"][0]["box"].values()]
    small_box = list(small_body["results"][0]["box"].values())
    assert box_iou(large_box, obj.box) > 0.7 and box_iou(small_box, obj.box) > 0.7
    assert large_box == pytest.approx(small_box, abs=3)


def test_a_damaged_header_is_a_corrupt_image_of_its_format() -> None:
    """Pillow refuses a PNG whose header is damaged as it refuses a file of another format: by its signature it is a
    corrupt PNG (422 saying so), not an unsupported type (415)."""
    damaged = PNG[:30] + bytes([PNG[30] ^ 0xFF]) + PNG[31:]
    with pytest.raises(ApiError) as refused:
        decode_image(damaged, 10**7, 100)
    assert (refused.value.status, refused.value.message) == (422, "corrupt PNG image: its header cannot be read")
