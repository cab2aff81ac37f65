"""Fuzzing the loaders of untrusted files with mutated copies of valid ones.

Each target starts from a valid file and applies mutations drawn by hypothesis: byte overwrites, truncation,
insertions, and mutations that know the format (PNG chunks with correct CRCs, NIfTI header fields, run config
values, safetensors header length, header JSON and tensor bytes), so that the mutants get past the first
integrity checks and reach the decoders. The only outcomes allowed are success and the project's own
BrainVQError (DataError, ConfigError, CheckpointError): any other exception is a bug in the loader.

The examples are derandomized (the same on every run, so CI is reproducible) and few enough that the whole file
runs in well under 30 s on two cores.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from brainvq.checkpoint import (
    load_checkpoint,
    load_module_state,
    module_tensors,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from brainvq.config import TrainConfig, VQVAEConfig
from brainvq.data.check import check_data
from brainvq.data.dataset import load_split
from brainvq.data.layout import split_folder
from brainvq.data.volumes import load_volume, slice_volume
from brainvq.errors import BrainVQError
from brainvq.images import load_png
from brainvq.models.vqvae import VQVAE
from brainvq.run import BEST_CHECKPOINT, LAST_CHECKPOINT, load_vqvae, read_run_config, write_run_config

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def survives(target: Callable[[], object]) -> None:
    """Run `target`: returning or raising a BrainVQError with a one-line message passes; anything else fails."""
    try:
        target()
    except BrainVQError as error:
        assert "\n" not in str(error) and str(error)


@st.composite
def byte_mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with a few bytes overwritten, a run inserted or deleted, or its tail cut off."""
    data = bytearray(original)
    kind = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate"]))
    if kind == "overwrite":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "delete":
        at = draw(st.integers(0, len(data) - 1))
        del data[at : at + draw(st.integers(1, 64))]
    else:
        del data[draw(st.integers(0, len(data) - 1)) :]
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per module: hypothesis runs many examples per test, and each rewrites the files it uses."""
    return tmp_path_factory.mktemp("fuzz")


# --- PNG slices ---------------------------------------------------------------------------------------------

def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        chunks.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def png_bytes(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, each with a correct CRC, so that the mutation reaches the decoder."""
    body = b"".join(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
                    for kind, data in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def valid_pngs() -> list[bytes]:
    """256x256 slices as 8-bit grayscale, 16-bit grayscale, RGB and palette PNGs."""
    ramp = np.add.outer(np.arange(256), np.arange(256))
    images = [Image.fromarray((ramp % 256).astype(np.uint8)), Image.fromarray((ramp * 128).astype(np.uint16)),
              Image.fromarray(np.stack([ramp % 256, ramp // 2, 255 - ramp % 256], -1).astype(np.uint8)),
              Image.fromarray((ramp % 256).astype(np.uint8)).convert("P")]
    encoded = []
    for image in images:
        image.save(buffer := io.BytesIO(), format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


PNGS = valid_pngs()
DIMENSIONS = st.one_of(st.integers(0, 300), st.integers(0, 2**31 - 1), st.sampled_from([256, 65535, 2**31 - 1]))


@st.composite
def chunk_mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """A PNG whose header fields, pixel data or ancillary chunks are replaced, with valid CRCs throughout."""
    chunks = png_chunks(original)
    kind = draw(st.sampled_from(["header", "pixels", "extra chunk", "drop chunk"]))
    if kind == "header":
        _, header = chunks[0]
        width, height, depth, colour, *rest = struct.unpack(">IIBBBBB", header)
        width, height = draw(st.one_of(st.tuples(DIMENSIONS, st.just(height)), st.tuples(st.just(width), DIMENSIONS),
                                       st.tuples(DIMENSIONS, DIMENSIONS)))
        depth = draw(st.sampled_from([depth, 1, 2, 4, 8, 16, 0, 3, 255]))
        colour = draw(st.sampled_from([colour, 0, 2, 3, 4, 6, 1, 7]))
        rest[2] = draw(st.sampled_from([rest[2], 1, 2]))  # interlace
        chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, *rest))
    elif kind == "pixels":
        raw = draw(st.binary(max_size=512))
        pixels = draw(st.sampled_from([zlib.compress(raw), raw, zlib.compress(b"\0" * draw(st.integers(0, 10**6)))]))
        chunks = [chunk for chunk in chunks if chunk[0] != b"IDAT"]
        chunks.insert(-1, (b"IDAT", pixels))
    elif kind == "extra chunk":
        name = draw(st.sampled_from([b"PLTE", b"tRNS", b"zTXt", b"iCCP", b"tEXt", b"gAMA", b"sBIT", b"IDAT"]))
        payload = draw(st.one_of(st.binary(max_size=64), st.just(b"k\0\0" + zlib.compress(b"x" * 10**6))))
        chunks.insert(draw(st.integers(1, len(chunks) - 1)), (name, payload))
    else:
        del chunks[draw(st.integers(0, len(chunks) - 1))]
    return png_bytes(chunks)


MUTATED_PNGS = st.sampled_from(PNGS).flatmap(lambda png: st.one_of(byte_mutations(png), chunk_mutations(png)))


@FUZZ
@given(content=MUTATED_PNGS)
def test_load_png_survives_mutated_pngs(scratch: Path, content: bytes) -> None:
    path = scratch / "slice.png"
    path.write_bytes(content)
    survives(lambda: load_png(path))


@FUZZ
@given(content=MUTATED_PNGS)
def test_load_split_and_check_survive_a_mutated_slice(scratch: Path, content: bytes) -> None:
    data_dir = scratch / "oasis"
    shutil.rmtree(data_dir, ignore_errors=True)
    for split in ("train", "validate", "test"):
        split_folder(data_dir, split).mkdir(parents=True)
    (split_folder(data_dir, "train") / "case_001_slice_0.nii.png").write_bytes(content)
    survives(lambda: load_split(data_dir, "train", cache_dir=scratch / "cache"))
    report = check_data(data_dir)
    assert report.problems  # at the least, case 001 lacks slices 1..31 and two splits are empty


# --- NIfTI volumes ------------------------------------------------------------------------------------------

# (offset, struct format) of the NIfTI-1 header fields that steer how the data is read and placed.
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern": (256, "<6f"), "srow": (280, "<12f"),
    "magic": (344, "<4s"),
}
INT16 = st.one_of(st.integers(-2, 40), st.sampled_from([-32768, 32767, 255, 256, 511, 512, 1024, 2048]))
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def valid_volume(folder: Path) -> bytes:
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (12, 14, 10)), indexing="ij"))
    head = np.where((grid**2).sum(0) < 0.7, 100 + 40 * grid[2], 0).astype(np.float32)
    path = folder / "valid.nii"
    nib.save(nib.Nifti1Image(head, np.diag([1.5, 1.2, 2.0, 1.0])), path)
    return path.read_bytes()


@st.composite
def nifti_mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """The volume with one header field rewritten (any value of its type) or its voxel bytes overwritten."""
    data = bytearray(original)
    if draw(st.booleans()):
        offset, layout = NIFTI_FIELDS[draw(st.sampled_from(sorted(NIFTI_FIELDS)))]
        values = {"h": INT16, "i": st.integers(-(2**31), 2**31 - 1), "f": FLOAT32,
                  "s": st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0"])}[layout[-1]]
        end = offset + struct.calcsize(layout)
        fields = list(struct.unpack(layout, data[offset:end]))
        for _ in range(draw(st.integers(1, len(fields)))):
            fields[draw(st.integers(0, len(fields) - 1))] = draw(values)
        data[offset:end] = struct.pack(layout, *fields)
        return bytes(data)
    return draw(byte_mutations(original))


@pytest.fixture(scope="module")
def volume_bytes(scratch: Path) -> bytes:
    return valid_volume(scratch)


@FUZZ
@given(data=st.data())
def test_load_volume_survives_mutated_nifti(scratch: Path, volume_bytes: bytes, data: st.DataObject) -> None:
    content = data.draw(nifti_mutations(volume_bytes))
    compressed = data.draw(st.booleans())
    path = scratch / ("mutated.nii.gz" if compressed else "mutated.nii")
    path.write_bytes(gzip.compress(content, mtime=0) if compressed else content)
    survives(lambda: slice_volume(load_volume(path)))


# --- run config ---------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


@st.composite
def config_mutations(draw: st.DrawFn, original: dict) -> bytes:
    """The run config with a value replaced, a key dropped or added, a section replaced, or its text damaged."""
    values = json.loads(json.dumps(original))
    kind = draw(st.sampled_from(["value", "drop", "add", "section", "top", "text"]))
    section = draw(st.sampled_from(["model", "train"]))
    key = draw(st.sampled_from(sorted(values[section])))
    if kind == "value":
        values[section][key] = draw(JSON_VALUES | st.integers(-(2**63), 2**63))
    elif kind == "drop":
        del values[section][key]
    elif kind == "add":
        (values if draw(st.booleans()) else values[section])["unknown"] = draw(JSON_VALUES)
    elif kind == "section":
        values[section] = draw(JSON_VALUES)
    elif kind == "top":
        values = draw(JSON_VALUES)
    text = json.dumps(values)  # NaN and Infinity included, as Python's json reads them
    return draw(byte_mutations(text.encode())) if kind == "text" else text.encode()


def valid_run_config(folder: Path) -> dict:
    write_run_config(folder, VQVAEConfig(), TrainConfig())
    return json.loads((folder / "config.json").read_text())


@FUZZ
@given(data=st.data())
def test_read_run_config_survives_mutated_json(scratch: Path, data: st.DataObject) -> None:
    run = scratch / "config-run"
    original = valid_run_config(run)
    (run / "config.json").write_bytes(data.draw(config_mutations(original)))
    survives(lambda: read_run_config(run))


# --- checkpoints --------------------------------------------------------------------------------------------

TINY = VQVAEConfig(image_size=32, downsample=16, channels=4, residual_channels=2, residual_blocks=1, code_dim=3,
                   codebook_size=4)


@pytest.fixture(scope="module")
def tiny_run(scratch: Path) -> Path:
    """A run folder holding a tiny VQ-VAE: config.json, and best and last checkpoints (as training writes them)
    after one optimizer step."""
    run = scratch / "checkpoint-run"
    write_run_config(run, TINY, TrainConfig())
    torch.manual_seed(0)
    model = VQVAE(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    model.loss(images := torch.rand(2, 1, 32, 32), model(images))["loss"].backward()
    optimizer.step()
    weights = module_tensors(model, "model.")
    save_checkpoint(run / BEST_CHECKPOINT, weights, {"epoch": 1, "step": 1, "val": {"ssim": 0.5}})
    optim_tensors, optim_state = optimizer_tensors(optimizer)
    history = [{"epoch": 1, "step": 1, "val": {"ssim": 0.5}, "elapsed_seconds": 1.0}]
    save_checkpoint(run / LAST_CHECKPOINT, weights | optim_tensors, {"epoch": 1, "step": 1, "history": history,
                                                                     "optimizer": optim_state, "elapsed_seconds": 1.0})
    return run


def safetensors_parts(content: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(content[:8], "little")
    return json.loads(content[8 : 8 + length]), content[8 + length :]


@st.composite
def safetensors_mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """The checkpoint with its header length, one tensor's entry or the metadata changed, or bytes damaged."""
    header, body = safetensors_parts(original)
    kind = draw(st.sampled_from(["length", "entry", "drop", "metadata", "bytes"]))
    if kind == "length":
        length = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(-16, 16).map(
            lambda delta: max(0, len(original) + delta))))
        return length.to_bytes(8, "little") + original[8:]
    if kind == "bytes":
        return draw(byte_mutations(original))
    names = sorted(name for name in header if name != "__metadata__")
    name = draw(st.sampled_from(names))
    if kind == "entry":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw({
            "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "C64"]),
            "shape": st.lists(st.integers(0, 2**20), max_size=4),
            "data_offsets": st.lists(st.integers(0, len(body) + 8), min_size=2, max_size=2).map(sorted),
        }[field])
    elif kind == "drop":
        del header[name]
    else:
        metadata = json.loads(header["__metadata__"]["brainvq"])
        if draw(st.booleans()):
            metadata[draw(st.sampled_from(sorted(metadata)))] = draw(JSON_VALUES)
        elif "optimizer" in metadata:  # the optimizer's hyper-parameters (lr, betas, amsgrad...)
            group = metadata["optimizer"]["param_groups"][0]
            group[draw(st.sampled_from(sorted(group)))] = draw(JSON_VALUES)
        header["__metadata__"]["brainvq"] = json.dumps(metadata)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def resume_tiny(path: Path) -> None:
    """What resuming does with a last checkpoint, then one optimizer step with the restored state."""
    model = VQVAE(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    tensors, metadata = load_checkpoint(path)
    load_module_state(model, tensors, prefix="model.", source=path)
    restore_optimizer(optimizer, tensors, metadata.get("optimizer"), source=path)
    model.loss(images := torch.rand(2, 1, 32, 32), model(images))["loss"].backward()
    optimizer.step()


@FUZZ
@given(data=st.data())
def test_checkpoint_loading_survives_mutated_safetensors(tiny_run: Path, data: st.DataObject) -> None:
    which = data.draw(st.sampled_from([BEST_CHECKPOINT, LAST_CHECKPOINT]))
    pristine = tiny_run / f"{which}.pristine"
    if not pristine.exists():
        shutil.copy(tiny_run / which, pristine)
    original = pristine.read_bytes()
    (tiny_run / which).write_bytes(data.draw(safetensors_mutations(original)))
    try:
        if which == BEST_CHECKPOINT:
            survives(lambda: load_vqvae(tiny_run, checkpoint="best"))
        else:
            survives(lambda: resume_tiny(tiny_run / which))
    finally:
        (tiny_run / which).write_bytes(original)
