from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from brainvq.data.dataset import load_split
from brainvq.data.label_maps import FAST, FREESURFER, load_label_map
from brainvq.data.layout import (
    MASK_VALUES,
    SLICES_PER_CASE,
    SPLITS,
    list_slices,
    mask_folder,
    slice_file_name,
    split_folder,
)
from brainvq.data.volumes import (
    FRAME_FILL,
    GEOMETRY_FILE,
    MAX_SLICES,
    Volume,
    find_volumes,
    load_volume,
    match_labels,
    slice_volume,
    volumes_to_layout,
)
from brainvq.errors import ConfigError, DataError

ZOOMS = (1.2, 1.0, 1.0)
SHAPE = (60, 70, 50)


def phantom() -> np.ndarray:
    """An ellipsoid 'head' (semi-axes 24 x 30 x 22 mm at ZOOMS) brighter toward right, anterior and superior."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    inside = ((x - 30) * 1.2 / 24) ** 2 + ((y - 35) / 30) ** 2 + ((z - 25) / 22) ** 2 <= 1
    return np.where(inside, 100 + 2 * x + 3 * y + 1 * z, 0).astype(np.float32)


def foreground_mean(image: np.ndarray) -> float:
    return float(image[image > 0].mean())


def save(path: Path, data: np.ndarray, image_type=nib.Nifti1Image) -> Path:
    nib.save(image_type(data, np.diag([*ZOOMS, 1.0])), path)
    return path


@pytest.fixture
def volume_file(tmp_path: Path) -> Path:
    return save(tmp_path / "subject.nii.gz", phantom())


def test_load_volume_returns_float32_data_and_zooms(volume_file: Path) -> None:
    volume = load_volume(volume_file)
    assert volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data, phantom())
    assert volume.zooms == pytest.approx(ZOOMS)
    assert volume.path == volume_file


def test_load_volume_reorients_to_ras(tmp_path: Path) -> None:
    # Stored left-right and front-back flipped, with an affine that says so: the same anatomy.
    flipped = tmp_path / "lps.nii"
    affine = np.diag([-1.2, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(phantom()[::-1, ::-1].copy(), affine), flipped)
    np.testing.assert_array_equal(load_volume(flipped).data, phantom())


def test_load_volume_drops_a_singleton_fourth_dimension(tmp_path: Path) -> None:
    path = save(tmp_path / "4d.nii", phantom()[..., None])
    assert load_volume(path).data.shape == SHAPE


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (np.ones((20, 20), dtype=np.float32), "expected a 3D volume, got shape (20, 20)"),
        (np.ones((20, 20, 20, 3), dtype=np.float32), "expected a 3D volume, got shape (20, 20, 20, 3)"),
        (np.full((20, 20, 20), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.zeros((20, 20, 20), dtype=np.float32), "constant intensity"),
    ],
)
def test_load_volume_rejects_unusable_volumes(tmp_path: Path, data: np.ndarray, problem: str) -> None:
    path = save(tmp_path / "bad.nii.gz", data)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: .*{re.escape(problem)}"):
        load_volume(path)


def test_load_volume_names_files_that_are_not_volumes(tmp_path: Path, volume_file: Path) -> None:
    text = tmp_path / "notes.nii"
    text.write_text("not a volume")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(volume_file.read_bytes()[:2000])
    for path in (text, truncated, tmp_path / "missing.nii"):
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}: cannot read"):
            load_volume(path)


def test_slice_volume_frames_the_head_keeping_its_aspect_ratio() -> None:
    slices = slice_volume(Volume(phantom(), ZOOMS)).images
    assert slices.shape == (SLICES_PER_CASE, 256, 256)
    assert slices.dtype == np.uint8
    rows, columns = np.nonzero(slices[SLICES_PER_CASE // 2])
    height, width = np.ptp(rows) + 1, np.ptp(columns) + 1
    # The longer side (60 mm front to back) spans FRAME_FILL of the image; the width follows in millimetres.
    assert height == pytest.approx(FRAME_FILL * 256, rel=0.05)
    assert width / height == pytest.approx(48 / 60, rel=0.05)
    assert slices[:, 0, :].max() == slices[:, :, 0].max() == 0


def test_slice_volume_shows_a_radiological_view_from_bottom_to_top() -> None:
    slices = slice_volume(Volume(phantom(), ZOOMS)).images
    middle = slices[SLICES_PER_CASE // 2]
    assert foreground_mean(middle[:128]) > foreground_mean(middle[128:])  # anterior is up
    assert foreground_mean(middle[:, :128]) > foreground_mean(middle[:, 128:])  # the subject's right is left
    assert foreground_mean(slices[-1]) > foreground_mean(slices[0])  # slice 0 is the lowest


def test_slice_volume_spans_the_middle_of_the_head() -> None:
    slices = slice_volume(Volume(phantom(), ZOOMS)).images
    areas = np.count_nonzero(slices, axis=(1, 2))
    assert areas.min() > 0  # no slice falls outside the head
    assert areas[0] < areas[SLICES_PER_CASE // 2] and areas[-1] < areas[SLICES_PER_CASE // 2]


def test_slice_volume_shows_a_binary_mask_as_white_on_black() -> None:
    middle = slice_volume(Volume((phantom() > 0).astype(np.float32), ZOOMS)).images[SLICES_PER_CASE // 2]
    assert (middle[128, 128], middle[0, 0]) == (255, 0)


def test_slice_volume_rejects_a_volume_without_foreground() -> None:
    data = np.zeros(SHAPE, dtype=np.float32)
    data[1, 1, 1] = 1  # skipped by the strided extent measurement
    with pytest.raises(DataError, match="too little foreground"):
        slice_volume(Volume(data, ZOOMS))


def test_find_volumes_counts_an_analyze_pair_once(tmp_path: Path) -> None:
    save(tmp_path / "b.nii", phantom())
    (tmp_path / "nested").mkdir()
    save(tmp_path / "nested" / "a.hdr", phantom(), image_type=nib.AnalyzeImage)
    (tmp_path / ".hidden.nii").write_bytes(b"")
    assert find_volumes(tmp_path) == {"b": tmp_path / "b.nii", "nested/a": tmp_path / "nested" / "a.hdr"}


def test_find_volumes_rejects_two_files_for_one_subject(tmp_path: Path) -> None:
    save(tmp_path / "a.nii", phantom())
    save(tmp_path / "a.nii.gz", phantom())
    with pytest.raises(DataError, match="two volumes for subject a"):
        find_volumes(tmp_path)


def test_volumes_to_layout_writes_one_case_per_volume(tmp_path: Path) -> None:
    src = tmp_path / "scans"
    src.mkdir()
    for name in ("s1", "s2", "s3"):
        save(src / f"{name}.nii.gz", phantom())
    out_dir = tmp_path / "slices"
    summary = volumes_to_layout(src, out_dir)
    assert summary["cases"] == {"train": 1, "validate": 1, "test": 1}
    assert summary["subjects"] == summary["cases"]
    rows = [line.split("\t") for line in (out_dir / "cases.tsv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ["001", "002", "003"]
    assert [Path(row[1]).name for row in rows] == ["s1.nii.gz", "s2.nii.gz", "s3.nii.gz"]
    assert [row[3] for row in rows] == ["s1", "s2", "s3"]  # each volume its own subject
    for case, _, split, _ in rows:
        names = [path.name for path in list_slices(split_folder(out_dir, split))]
        assert names == [f"case_{case}_slice_{index}.nii.png" for index in range(SLICES_PER_CASE)]
    assert sorted(row[2] for row in rows) == sorted(SPLITS)


def test_volumes_to_layout_writes_nothing_if_a_volume_is_bad(tmp_path: Path) -> None:
    src = tmp_path / "scans"
    src.mkdir()
    save(src / "good.nii", phantom())
    bad = save(src / "zero.nii", np.zeros(SHAPE, dtype=np.float32))
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: volume has constant intensity"):
        volumes_to_layout(src, tmp_path / "slices")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scans"]


def test_volumes_to_layout_needs_volumes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no NIfTI or Analyze volumes"):
        volumes_to_layout(tmp_path, tmp_path / "slices")


def test_slice_volume_spreads_the_slices_over_the_range_asked_for() -> None:
    volume = Volume(phantom(), ZOOMS)
    # The phantom's foreground runs from z = 3 to 47 mm (centre 25, semi-axis 22, 1 mm voxels along z).
    for n_slices, axial_range, (bottom, top) in ((3, (0.0, 1.0), (3, 47)), (2, (0.5, 0.75), (25, 36))):
        sliced = slice_volume(volume, n_slices, axial_range=axial_range)
        assert sliced.images.shape == (n_slices, 256, 256)
        heights = [(sliced.to_mm @ [128, 128, index, 1])[2] for index in (0, n_slices - 1)]
        assert heights == pytest.approx([bottom, top], abs=1.5)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"n_slices": 0}, f"the number of slices must be a whole number from 1 to {MAX_SLICES}, got 0"),
        ({"n_slices": MAX_SLICES + 1}, f"got {MAX_SLICES + 1}"),
        ({"n_slices": 2.5}, "the number of slices must be a whole number"),
        ({"n_slices": True}, "the number of slices must be a whole number"),
        ({"axial_range": (0.6, 0.6)}, "the axial range must be two fractions LOW HIGH"),
        ({"axial_range": (0.9, 0.1)}, "0 <= LOW < HIGH <= 1, got (0.9, 0.1)"),
        ({"axial_range": (-0.1, 0.5)}, "the axial range must be"),
        ({"axial_range": (0.2, 1.5)}, "the axial range must be"),
        ({"axial_range": (float("nan"), 0.5)}, "the axial range must be"),
        ({"axial_range": (0.5,)}, "the axial range must be"),
    ],
)
def test_volumes_to_layout_refuses_bad_slicing_options(tmp_path: Path, options: dict, problem: str) -> None:
    source = save(tmp_path / "s1.nii", phantom())
    with pytest.raises(ConfigError, match=re.escape(problem)) as error:
        volumes_to_layout(source, tmp_path / "slices", **options)
    assert "\n" not in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["s1.nii"]


def test_volumes_to_layout_keeps_the_sessions_of_a_bids_subject_in_one_split(tmp_path: Path) -> None:
    src = tmp_path / "bids"
    sessions = {"01": ("ses-1", "ses-2"), "02": ("ses-a", "ses-b"), "03": ("ses-1",), "04": ("",)}  # "": none
    t1w = []
    for subject, labels in sessions.items():
        for label in labels:
            anat = src / f"sub-{subject}" / label / "anat"
            anat.mkdir(parents=True)
            t1w.append(save(anat / "_".join(filter(None, (f"sub-{subject}", label, "T1w.nii.gz"))), phantom()))
    # Not T1-weighted, or not raw data: left out.
    save(src / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T2w.nii.gz", phantom())
    (src / "derivatives" / "sub-01" / "anat").mkdir(parents=True)
    save(src / "derivatives" / "sub-01" / "anat" / "sub-01_desc-brain_T1w.nii.gz", phantom())
    out_dir = tmp_path / "slices"
    summary = volumes_to_layout(src, out_dir)
    rows = [line.split("\t") for line in (out_dir / "cases.tsv").read_text().splitlines()[1:]]
    assert [Path(row[1]) for row in rows] == [path.resolve() for path in t1w]
    assert [row[3] for row in rows] == [f"sub-{subject}" for subject, labels in sessions.items() for _ in labels]
    assert len({(subject, split) for _, _, split, subject in rows}) == len(sessions)  # one split per subject
    assert summary["subjects"] == {"train": 2, "validate": 1, "test": 1}
    assert sum(summary["cases"].values()) == len(t1w)


def test_volumes_to_layout_records_where_each_slice_pixel_lies_in_its_volume(tmp_path: Path) -> None:
    # Stored posterior-to-anterior first, then left-to-right, and shifted: the file's voxel order is not the RAS+
    # order the slices are cut in, so the recorded map must undo the reorientation.
    data = phantom().transpose(1, 0, 2)[::-1].copy()
    affine = np.array([[0, 1.2, 0, -36], [-1.0, 0, 0, 35], [0, 0, 1.0, -25], [0, 0, 0, 1]])
    src = tmp_path / "scans"
    src.mkdir()
    path = src / "subject.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    out_dir = tmp_path / "slices"
    volumes_to_layout(src, out_dir)
    geometry = json.loads((out_dir / GEOMETRY_FILE).read_text())
    assert (geometry["n_slices"], geometry["axial_range"]) == (SLICES_PER_CASE, [0.25, 0.85])
    (case,) = geometry["cases"]
    assert (case["case"], case["source"], case["subject"]) == ("001", str(path.resolve()), "subject")
    np.testing.assert_allclose(case["affine"], affine)
    pixel_to_voxel = np.array(case["pixel_to_voxel"])
    np.testing.assert_allclose(case["pixel_to_world"], affine @ pixel_to_voxel)
    black, white = case["intensity"]
    for slice_index in (0, SLICES_PER_CASE // 2, SLICES_PER_CASE - 1):
        image = np.asarray(Image.open(split_folder(out_dir, case["split"]) / slice_file_name(1, slice_index)))
        rows, columns = np.nonzero((image > 0) & (image < 255))  # inside the head, not clipped by the 8-bit scale
        assert rows.size > 1000
        pixels = np.stack([rows, columns, np.full_like(rows, slice_index), np.ones_like(rows)])
        values = ndimage.map_coordinates(data, (pixel_to_voxel @ pixels)[:3], order=1)  # the file's own array
        expected = (values - black) * 255 / (white - black)
        assert np.abs(expected - image[rows, columns]).max() < 0.51  # 8-bit rounding only


# --- tissue label volumes -----------------------------------------------------------------------------------

LABEL_SLICES = 4  # few slices keep these tests quick
# Slices away from the default range, whose lowest one falls exactly halfway between two voxel planes of the
# phantom (either voxel is then the nearest).
LABEL_RANGE = (0.3, 0.8)
# Stored posterior-to-anterior first, then left-to-right, and shifted (as in the test above): the label volume
# must follow the image through the reorientation to RAS+.
STORED_AFFINE = np.array([[0, 1.2, 0, -36], [-1.0, 0, 0, 35], [0, 0, 1.0, -25], [0, 0, 0, 1]])


def stored(data: np.ndarray) -> np.ndarray:
    """A RAS+ array of SHAPE in the voxel order of STORED_AFFINE."""
    return data.transpose(1, 0, 2)[::-1].copy()


def tissue_labels(values: tuple[int, int, int] = (1, 2, 3)) -> np.ndarray:
    """int16 RAS+ [SHAPE] labels of the phantom's head: 0 outside; inside, ``values`` (CSF, GM, WM) for a
    posterior CSF cap, a white matter column through the middle, grey matter elsewhere."""
    x, y, _ = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    csf, grey, white = values
    labels = np.where(phantom() > 0, grey, 0)
    labels[(phantom() > 0) & (y > 55)] = csf
    labels[(phantom() > 0) & (abs(x - 30) < 8) & (abs(y - 35) < 10)] = white
    return labels.astype(np.int16)


def t1_of(labels: np.ndarray, intensities: dict[int, float]) -> np.ndarray:
    """A 'T1' (float32) whose intensity is set by the tissue: white matter brightest, CSF darkest."""
    t1 = np.zeros(labels.shape, dtype=np.float32)
    for value, intensity in intensities.items():
        t1[labels == value] = intensity
    return t1


def labelled_scans(root: Path, labels: np.ndarray, intensities: dict[int, float], names=("s1",)) -> tuple[Path, Path]:
    """Folders ``root/scans`` and ``root/labels`` with ``<name>.nii.gz`` and ``<name>_seg.nii.gz`` per name."""
    (root / "scans").mkdir()
    (root / "labels").mkdir()
    for name in names:
        nib.save(nib.Nifti1Image(stored(t1_of(labels, intensities)), STORED_AFFINE), root / "scans" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(stored(labels), STORED_AFFINE), root / "labels" / f"{name}_seg.nii.gz")
    return root / "scans", root / "labels"


def convert(src: Path, out_dir: Path, **options) -> dict:
    """volumes_to_layout with LABEL_SLICES slices over LABEL_RANGE."""
    return volumes_to_layout(src, out_dir, n_slices=LABEL_SLICES, axial_range=LABEL_RANGE, **options)


def read_case(out_dir: Path, split: str, case_number: int, prefix: str = "case") -> np.ndarray:
    folder = (split_folder if prefix == "case" else mask_folder)(out_dir, split)
    return np.stack([np.asarray(Image.open(folder / slice_file_name(case_number, index, prefix)))
                     for index in range(LABEL_SLICES)])


def assert_nearest_labels(masks: np.ndarray, out_dir: Path, stored_labels: np.ndarray,
                          oasis_value: dict[int, int]) -> None:
    """Check the masks of case 001 against what volumes.json alone says they must be: for each pixel, the OASIS
    value of the label of the file voxel nearest to where its image pixel was sampled (0 outside the volume).

    Pixels sampled halfway between two voxels may take either; there must be few of them.
    """
    (case,) = json.loads((out_dir / GEOMETRY_FILE).read_text())["cases"]
    rows, columns = (grid.ravel() for grid in np.mgrid[:256, :256])
    for slice_index in range(LABEL_SLICES):
        pixels = np.stack([rows, columns, np.full_like(rows, slice_index), np.ones_like(rows)])
        points = (np.array(case["pixel_to_voxel"]) @ pixels)[:3]
        voxels = np.rint(points).astype(int)
        inside = ((voxels >= 0) & (voxels < np.array(stored_labels.shape)[:, None])).all(axis=0)
        expected = np.zeros(rows.size, dtype=np.uint8)
        expected[inside] = [oasis_value[label] for label in stored_labels[tuple(voxels[:, inside])]]
        ties = (np.abs(points - np.floor(points) - 0.5) < 1e-3).any(axis=0)
        assert ties.mean() < 0.05  # a few whole rows or columns at most
        np.testing.assert_array_equal(masks[slice_index].ravel()[~ties], expected[~ties])


def test_label_volumes_give_masks_of_the_nearest_voxel_where_the_image_was_sampled(tmp_path: Path) -> None:
    labels = tissue_labels()
    scans, label_folder = labelled_scans(tmp_path, labels, {1: 50, 2: 100, 3: 200})
    out_dir = tmp_path / "slices"
    summary = convert(scans, out_dir, labels=label_folder)
    assert summary["label_map"] == "fast"
    (split,) = [split for split in SPLITS if summary["cases"][split]]
    images, masks = read_case(out_dir, split, 1), read_case(out_dir, split, 1, "seg")
    assert_nearest_labels(masks, out_dir, stored(labels), dict(zip(range(4), MASK_VALUES, strict=True)))
    assert set(np.unique(masks)) == set(MASK_VALUES)  # all four classes, nothing interpolated between them
    # The masks lie where the image shows each tissue: its bright column is white matter, its dark cap CSF.
    csf, grey, white = (images[masks == value].mean() for value in MASK_VALUES[1:])
    assert csf < grey < white
    assert (images[masks == 0] == 0).mean() > 0.99
    rows = [line.split("\t") for line in (out_dir / "cases.tsv").read_text().splitlines()]
    assert rows[0][-1] == "labels" and rows[1][-1] == str((label_folder / "s1_seg.nii.gz").resolve())


def test_freesurfer_labels_map_to_the_four_classes(tmp_path: Path) -> None:
    labels = tissue_labels(values=(4, 42, 41))  # lateral ventricle, right cortex, right cerebral white matter
    labels[labels == 42] = np.where(np.arange(SHAPE[2]) % 2, 42, 1010)[np.nonzero(labels == 42)[2]]  # aparc cortex
    scans, label_folder = labelled_scans(tmp_path, labels, {4: 50, 42: 100, 1010: 100, 41: 200})
    out_dir = tmp_path / "slices"
    convert(scans, out_dir, labels=label_folder, label_map="freesurfer")
    split = json.loads((out_dir / GEOMETRY_FILE).read_text())["cases"][0]["split"]
    masks = read_case(out_dir, split, 1, "seg")
    assert_nearest_labels(masks, out_dir, stored(labels), {0: 0, 4: 85, 42: 170, 1010: 170, 41: 255})
    assert set(np.unique(masks)) == set(MASK_VALUES)


def test_the_freesurfer_map_knows_aseg_and_aparc_labels() -> None:
    values = np.array([0, 2, 41, 7, 16, 77, 251, 3, 42, 10, 49, 17, 53, 8, 1035, 2000, 4, 43, 14, 24, 31, 80])
    expected = [0, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 2]  # 80: other labels are grey
    np.testing.assert_array_equal(FREESURFER.apply(values), expected)
    np.testing.assert_array_equal(FAST.apply(np.array([[0.0, 1.0], [2.0, 3.0]])), [[0, 1], [2, 3]])


def test_a_json_label_map_maps_its_values_and_refuses_others(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"0": "background", "1": "grey_matter", "2": "white_matter", "3": "csf"}))
    label_map = load_label_map(path)
    np.testing.assert_array_equal(label_map.apply(np.array([3, 2, 1, 0])), [1, 3, 2, 0])
    with pytest.raises(DataError, match=r"^labels.nii: .*does not know \(7\)"):
        label_map.apply(np.array([0, 7, 1]), "labels.nii")
    with pytest.raises(DataError, match="not whole numbers"):
        FAST.apply(np.array([0.0, 0.25, 1.0]))
    for table, problem in (({"1": "bone"}, "'bone' (for 1) is not one of"), ({"x": "csf"}, "'x' is not a whole"),
                           ([1, 2], "must be a JSON object")):
        path.write_text(json.dumps(table))
        with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: .*{re.escape(problem)}"):
            load_label_map(path)
    with pytest.raises(ConfigError, match="cannot read the label map"):
        load_label_map(tmp_path / "missing.json")


def test_load_split_pairs_every_slice_with_its_mask(tmp_path: Path) -> None:
    scans, label_folder = labelled_scans(tmp_path, tissue_labels(), {1: 50, 2: 100, 3: 200}, ("a", "b", "c"))
    out_dir = tmp_path / "slices"
    convert(scans, out_dir, labels=label_folder)
    for split in SPLITS:
        slices = load_split(out_dir, split)
        assert slices.labels is not None and slices.labels.shape == slices.images.shape == (LABEL_SLICES, 256, 256)
        case_number = int(slices.case_ids[0])
        np.testing.assert_array_equal(slices.labels, np.searchsorted(MASK_VALUES, read_case(out_dir, split,
                                                                                            case_number, "seg")))


def test_labels_leave_the_images_and_their_geometry_as_they_were(tmp_path: Path) -> None:
    scans, label_folder = labelled_scans(tmp_path, tissue_labels(), {1: 50, 2: 100, 3: 200}, ("a", "b", "c"))
    plain, masked = tmp_path / "plain", tmp_path / "masked"
    convert(scans, plain)
    convert(scans, masked, labels=label_folder)
    assert not any(mask_folder(plain, split).exists() for split in SPLITS)
    assert (plain / "cases.tsv").read_text().splitlines()[0] == "case\tsource\tsplit\tsubject"
    assert "label_map" not in json.loads((plain / GEOMETRY_FILE).read_text())
    for split in SPLITS:
        for path in list_slices(split_folder(plain, split)):
            assert (split_folder(masked, split) / path.name).read_bytes() == path.read_bytes()
    geometry = [json.loads((out / GEOMETRY_FILE).read_text())["cases"] for out in (plain, masked)]
    assert [case | {"labels": None} for case in geometry[0]] == [case | {"labels": None} for case in geometry[1]]


@pytest.mark.parametrize(
    ("label_slices", "label_affine", "problem"),
    [
        (slice(None, -1), STORED_AFFINE, "label volume has shape (70, 60, 49) but its image"),
        (slice(None), STORED_AFFINE + np.diag([0, 0, 0.05, 0]), "label volume's affine differs from that of its image"),
        (slice(None), STORED_AFFINE + np.outer(np.eye(4)[2], [0, 0, 0, 2.0]), "(voxels up to 2 mm apart)"),
    ],
)
def test_a_label_volume_off_the_image_grid_is_refused_naming_it(tmp_path: Path, label_slices: slice,
                                                                label_affine: np.ndarray, problem: str) -> None:
    scans, label_folder = labelled_scans(tmp_path, tissue_labels(), {1: 50, 2: 100, 3: 200})
    bad = label_folder / "s1_seg.nii.gz"
    nib.save(nib.Nifti1Image(stored(tissue_labels())[:, :, label_slices], label_affine), bad)
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: .*{re.escape(problem)}") as error:
        convert(scans, tmp_path / "slices", labels=label_folder)
    assert "\n" not in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels", "scans"]


def test_a_volume_without_a_label_volume_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    scans, label_folder = labelled_scans(tmp_path, tissue_labels(), {1: 50, 2: 100, 3: 200}, ("s1", "s2"))
    (label_folder / "s2_seg.nii.gz").unlink()
    (label_folder / "s3_seg.nii.gz").write_bytes(b"")  # matches no volume: ignored, so never read
    (scans / "s1.nii.gz").write_bytes(b"not read")  # a bad volume would be reported if volumes were read first
    with pytest.raises(DataError, match=f"^{re.escape(str(scans / 's2.nii.gz'))}: has no label volume in "
                                        f"{re.escape(str(label_folder))}"):
        convert(scans, tmp_path / "slices", labels=label_folder)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels", "scans"]


def test_label_files_are_matched_by_volume_id(tmp_path: Path) -> None:
    scans, labels = tmp_path / "scans", tmp_path / "labels"
    volume_names = ["s1.nii", "s2.nii.gz", "sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii"]
    label_names = [
        "s1.nii.gz",  # the same name as the volume
        "s2_pveseg.nii.gz", "s2_seg.nii.gz",  # FAST writes both: _seg wins
        "sub-01/anat/sub-01_dseg.nii.gz",  # BIDS derivative of sub-01_T1w
        "sub-02/ses-1/anat/sub-02_ses-1_dseg.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w_pveseg.nii.gz",
        "sub-01/anat/sub-01_space-MNI_dseg.nii.gz", "s3_seg.nii", "other/s1_seg.nii",  # match nothing
    ]
    for folder, names in ((scans, volume_names), (labels, label_names)):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"")
    assert match_labels(scans, find_volumes(scans), labels) == {
        "s1": labels / "s1.nii.gz",
        "s2": labels / "s2_seg.nii.gz",
        "sub-01/anat/sub-01_T1w": labels / "sub-01/anat/sub-01_dseg.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w": labels / "sub-02/ses-1/anat/sub-02_ses-1_T1w_pveseg.nii.gz",  # own id
    }
    with pytest.raises(DataError, match="labels must be a file when the volumes are one file"):
        match_labels(scans / "s1.nii", {"s1": scans / "s1.nii"}, labels)


def test_labels_may_lie_beside_their_volumes(tmp_path: Path) -> None:
    scans, label_folder = labelled_scans(tmp_path, tissue_labels(), {1: 50, 2: 100, 3: 200})
    (label_folder / "s1_seg.nii.gz").rename(scans / "s1_seg.nii.gz")
    out_dir = tmp_path / "slices"
    summary = convert(scans, out_dir, labels=scans)
    assert sum(summary["cases"].values()) == 1  # s1_seg is a label, not a second image
    (case,) = json.loads((out_dir / GEOMETRY_FILE).read_text())["cases"]
    assert Path(case["labels"]).name == "s1_seg.nii.gz"


def test_a_single_volume_takes_a_single_label_file(tmp_path: Path) -> None:
    scans, label_folder = labelled_scans(tmp_path, tissue_labels(), {1: 50, 2: 100, 3: 200})
    out_dir = tmp_path / "slices"
    convert(scans / "s1.nii.gz", out_dir, labels=label_folder / "s1_seg.nii.gz")
    assert len(list(mask_folder(out_dir, "train").iterdir())) == LABEL_SLICES


def test_a_label_map_without_labels_is_refused(tmp_path: Path) -> None:
    source = save(tmp_path / "s1.nii", phantom())
    with pytest.raises(ConfigError, match="give the label volumes too"):
        volumes_to_layout(source, tmp_path / "slices", label_map="freesurfer")
