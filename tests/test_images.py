from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainvq.errors import DataError, OutputError
from brainvq.images import GAP_VALUE, image_grid, load_png, save_grid, save_png, to_uint8


def test_png_round_trip_is_exact_and_8_bit_grayscale(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(37, 53), dtype=np.uint8)
    path = tmp_path / "slice.png"

    save_png(image, path)

    assert np.array_equal(load_png(path), image)
    with Image.open(path) as stored:
        assert (stored.format, stored.mode) == ("PNG", "L")


def test_save_png_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out" / "slice.png"
    save_png(np.zeros((8, 8), np.uint8), path)

    save_png(np.full((8, 8), 200, np.uint8), path)

    assert list(path.parent.iterdir()) == [path]
    assert (load_png(path) == 200).all()


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "slice.png"
    save_png(np.full((8, 8), 7, np.uint8), path)

    def fail_midway(image, file, **kwargs):
        Path(file).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail_midway)
    with pytest.raises(OutputError, match=r"slice\.png: cannot write \(disk full\); the previous version is intact"):
        save_png(np.zeros((8, 8), np.uint8), path)
    monkeypatch.undo()

    assert list(tmp_path.iterdir()) == [path]
    assert (load_png(path) == 7).all()


def test_to_uint8_scales_rounds_and_clamps():
    images = torch.tensor([-0.5, 0.0, 0.25, 1.0, 1.7]).view(1, 1, 1, 5)

    assert np.array_equal(to_uint8(images), [[[0, 0, 64, 255, 255]]])
    assert to_uint8(images).dtype == np.uint8


def test_to_uint8_accepts_arrays_without_channel_and_bf16_tensors():
    values = np.array([0.0, 0.25, 0.75, 1.0], dtype=np.float32).reshape(2, 1, 2)  # exact in bf16
    expected = [[[0, 64]], [[191, 255]]]

    assert np.array_equal(to_uint8(values), expected)
    assert np.array_equal(to_uint8(torch.from_numpy(values).bfloat16()[:, None]), expected)


def test_to_uint8_rejects_multichannel_images():
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        to_uint8(np.zeros((2, 3, 4, 4)))


def test_grid_places_each_image_in_its_tile_with_grey_gaps():
    height, width, pad = 4, 5, 2
    # Every image is filled with its own grey level, 10 * (3 * row + column) + 1.
    rows = [
        np.stack([np.full((height, width), 10 * (3 * r + c) + 1, np.uint8) for c in range(3)])
        for r in range(2)
    ]

    grid = image_grid(rows, pad=pad)

    assert grid.shape == (2 * height + pad, 3 * width + 2 * pad)
    tiles = np.zeros(grid.shape, dtype=bool)
    for r in range(2):
        for c in range(3):
            top, left = r * (height + pad), c * (width + pad)
            assert (grid[top : top + height, left : left + width] == rows[r][c]).all()
            tiles[top : top + height, left : left + width] = True
    assert (grid[~tiles] == GAP_VALUE).all()


def test_grid_rejects_rows_of_different_shapes():
    with pytest.raises(ValueError, match="one shape"):
        image_grid([np.zeros((2, 4, 4), np.uint8), np.zeros((3, 4, 4), np.uint8)])


def test_save_grid_writes_the_grid(tmp_path):
    rows = [np.random.default_rng(1).integers(0, 256, size=(2, 6, 6), dtype=np.uint8)]
    path = tmp_path / "grid.png"

    save_grid(rows, path, pad=3)

    assert np.array_equal(load_png(path), image_grid(rows, pad=3))


@pytest.mark.parametrize("content", [None, b"not an image", b"\x89PNG\r\n\x1a\n truncated"])
def test_load_png_raises_data_error_for_unreadable_files(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(DataError, match="cannot decode the image") as caught:
        load_png(path)
    assert caught.value.path == path


def test_load_png_raises_data_error_for_a_cut_off_png(tmp_path):
    path = tmp_path / "cut.png"
    save_png(np.random.default_rng(2).integers(0, 256, size=(64, 64), dtype=np.uint8), path)
    path.write_bytes(path.read_bytes()[:-200])

    with pytest.raises(DataError, match="cannot decode the image"):
        load_png(path)


def test_load_png_scales_16_bit_images_over_their_full_range(tmp_path):
    values = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)  # every 16-bit level once
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)

    loaded = load_png(path)

    # Scaled by the maximum (65535 -> 255), not clipped at 255: level v becomes round(v / 257).
    np.testing.assert_array_equal(loaded, np.rint(values / 257).astype(np.uint8))
    assert len(np.unique(loaded)) == 256
