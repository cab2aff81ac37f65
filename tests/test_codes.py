"""The code-grid cache of a run: reused while the checkpoint and the slices stay the same, remade otherwise."""

import shutil

import numpy as np
import torch

from brainvq import codes
from brainvq.codes import code_grids, encode_dataset, slice_outlines
from brainvq.config import VQVAEConfig
from brainvq.data.dataset import SliceDataset, load_split
from brainvq.models.vqvae import VQVAE
from brainvq.run import BEST_CHECKPOINT

CPU = torch.device("cpu")


def test_slices_replaced_in_place_with_size_and_mtime_kept_give_new_code_grids(
        tiny_cohort, tmp_path, monkeypatch, stored_png_writer):
    data = shutil.copytree(tiny_cohort, tmp_path / "data")
    slice_file = sorted((data / "keras_png_slices_test").iterdir())[0]
    stored_png_writer(slice_file, np.zeros((256, 256), dtype=np.uint8))
    run = tmp_path / "run"
    (run / BEST_CHECKPOINT).parent.mkdir(parents=True)
    (run / BEST_CHECKPOINT).write_bytes(b"the checkpoint")  # only its hash matters here: the model is given
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(downsample=8, channels=32, code_dim=16))
    encoded = []

    def counting_encoder(*args, **kwargs):
        encoded.append(args[1])
        return encode_dataset(*args, **kwargs)

    monkeypatch.setattr(codes, "encode_dataset", counting_encoder)

    code_grids(run, data, "test", model, device=CPU, precision="fp32")
    code_grids(run, data, "test", model, device=CPU, precision="fp32")
    assert len(encoded) == 1  # the second call reads the cache

    changed = np.zeros((256, 256), dtype=np.uint8)
    changed[64:192, 64:192] = 255
    stored_png_writer(slice_file, changed, in_place=True)
    grids = code_grids(run, data, "test", model, device=CPU, precision="fp32")
    assert len(encoded) == 2
    expected = encode_dataset(model, SliceDataset(load_split(data, "test")), device=CPU, precision="fp32")
    np.testing.assert_array_equal(grids.codes, expected)


def test_the_grids_of_mirrored_slices_are_cached_apart_from_the_others(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    (run / BEST_CHECKPOINT).parent.mkdir(parents=True)
    (run / BEST_CHECKPOINT).write_bytes(b"the checkpoint")
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(downsample=8, channels=32, code_dim=16))
    plain = code_grids(run, tiny_cohort, "train", model, device=CPU, precision="fp32", outlines=True)
    mirrored = code_grids(run, tiny_cohort, "train", model, device=CPU, precision="fp32", mirrored=True,
                          outlines=True)
    slices = load_split(tiny_cohort, "train")
    expected = encode_dataset(model, SliceDataset(slices, mirrored=True), device=CPU, precision="fp32")
    np.testing.assert_array_equal(mirrored.codes, expected)
    assert not np.array_equal(mirrored.codes, plain.codes)
    np.testing.assert_array_equal(mirrored.slice_indices, plain.slice_indices)
    for name, grids in (("train", plain), ("train_mirrored", mirrored)):  # each read back from its own file
        np.testing.assert_array_equal(np.load(run / "codes" / f"{name}.npy"), grids.codes)
        again = code_grids(run, tiny_cohort, "train", model, device=CPU, precision="fp32",
                           mirrored=name == "train_mirrored")
        np.testing.assert_array_equal(again.codes, grids.codes)
    np.testing.assert_array_equal(plain.outlines, slice_outlines(slices.images, 32))
    np.testing.assert_array_equal(mirrored.outlines, plain.outlines[:, :, ::-1])
    assert code_grids(run, tiny_cohort, "train", model, device=CPU, precision="fp32").outlines is None


def test_an_outline_takes_every_code_with_any_brain_pixel_and_fills_holes():
    slice_ = np.zeros((64, 64), dtype=np.uint8)
    slice_[16:48, 16:48] = 200  # a bright square ...
    slice_[28:36, 28:36] = 0  # ... with a dark hole (a ventricle, say)
    slice_[8, 58] = 200  # one bright pixel near the top right corner
    outline = slice_outlines(slice_[None], 16)[0]  # 4x4 pixels a code
    expected = np.zeros((16, 16), dtype=np.uint8)
    # The metrics' brain mask grows the bright pixels by 2: the square covers pixels 14..49, codes 3..12.
    expected[3:13, 3:13] = 1
    expected[1:3, 14] = 1  # the single pixel grown to rows 6..10, columns 56..60: codes (1..2, 14..15)
    expected[1:3, 15] = 1
    np.testing.assert_array_equal(outline, expected)
    mirrored = slice_outlines(slice_[None], 16, mirrored=True)[0]
    np.testing.assert_array_equal(mirrored, expected[:, ::-1])
