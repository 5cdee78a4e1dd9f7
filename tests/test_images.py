"""Reading users' images: 16-bit greyscale scaled rather than clipped to white, huge PNGs read from their header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linfusion.errors import UserError
from linfusion.images import ImageError, open_image, read_png_text
from support.pngs import png_header_only


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped_to_white(
    tmp_path: Path, mode: str
) -> None:
    values = np.array([[0, 30000], [65535, 257]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values.astype(np.int32 if mode == "I" else np.uint16), mode).save(path)
    image = open_image(path)
    assert image.mode == "RGB"
    expected = np.rint(values / 257.0).astype(np.uint8)  # 30000 -> 117, not 255
    np.testing.assert_array_equal(np.asarray(image)[..., 0], expected)
    np.testing.assert_array_equal(np.asarray(image)[..., 2], expected)


def test_eight_bit_images_are_unchanged(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "rgb.png")), rgb)


def test_a_16k_pngs_parameters_are_read_without_decoding_its_pixels(tmp_path: Path) -> None:
    path = png_header_only(tmp_path / "huge.png", 16384, 16384, "a cat\nSteps: 3, Size: 16384x16384")
    assert read_png_text(path) == "a cat\nSteps: 3, Size: 16384x16384"


def test_an_image_beyond_the_callers_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    path = png_header_only(tmp_path / "huge.png", 40000, 40000, "x")
    with pytest.raises(ImageError, match="40000x40000 pixels, more than the 268,435,456"):
        open_image(path, max_pixels=16384 * 16384)
    with pytest.raises(ImageError, match="40000x40000"):  # PIL's own limit by default: a clear error too
        open_image(path)
    assert Image.MAX_IMAGE_PIXELS is not None  # the PIL limit is restored


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n\x00"])
def test_missing_folders_and_non_images_are_user_errors(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(UserError, match="cannot read .*bad.png as an image"):
        open_image(tmp_path / "bad.png")
    with pytest.raises(UserError, match="no such file"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="is a folder"):
        open_image(tmp_path)
