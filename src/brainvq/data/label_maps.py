"""Label maps: how the values of a tissue label volume become the four classes of an OASIS segmentation mask.

The classes are the positions in :data:`~brainvq.data.layout.MASK_VALUES`: 0 background, 1 CSF, 2 grey matter,
3 white matter. A map is one of

* ``"fast"`` (the default): FSL FAST's ``*_seg``/``*_pveseg`` volumes, 0 background, 1 CSF, 2 grey matter,
  3 white matter; any other value is an error;
* ``"freesurfer"``: FreeSurfer ``aseg``/``aparc+aseg`` (also ``aparc.a2009s+aseg`` and ``wmparc``) labels, see
  :data:`FREESURFER_CLASSES` and :data:`FREESURFER_RANGES`; any other nonzero value counts as grey matter (the
  labels left over are small deep structures, vessels and non-WM hypointensities, closer to grey matter than to
  anything else);
* a JSON file ``{"<label value>": "background" | "csf" | "grey_matter" | "white_matter", ...}``; a value of the
  volume that the file does not name is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainvq.data.layout import MASK_CLASS_NAMES
from brainvq.errors import ConfigError, DataError

BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER = range(4)

# FreeSurfer's FreeSurferColorLUT labels of aseg, by class. Left/right pairs are listed together.
FREESURFER_CLASSES = {
    0: BACKGROUND,
    **dict.fromkeys(
        (
            3, 42,  # cerebral cortex
            8, 47,  # cerebellum cortex
            10, 49,  # thalamus
            11, 50,  # caudate
            12, 51,  # putamen
            13, 52,  # pallidum
            17, 53,  # hippocampus
            18, 54,  # amygdala
            26, 58,  # accumbens area
            28, 60,  # ventral DC
        ),
        GREY_MATTER,
    ),
    **dict.fromkeys(
        (
            2, 41,  # cerebral white matter
            7, 46,  # cerebellum white matter
            16,  # brainstem
            77, 78, 79,  # white matter hypointensities (whole, left, right)
            85,  # optic chiasm
            192,  # corpus callosum
            251, 252, 253, 254, 255,  # corpus callosum, posterior to anterior
        ),
        WHITE_MATTER,
    ),
    **dict.fromkeys(
        (
            4, 43,  # lateral ventricles
            5, 44,  # inferior lateral ventricles
            14, 15,  # 3rd and 4th ventricles
            24,  # CSF
            31, 63,  # choroid plexus
            72,  # 5th ventricle
        ),
        CSF,
    ),
}
# Inclusive ranges of FreeSurfer labels, by class: cortical parcels of aparc+aseg (1000-1035, 2000-2035, with
# room for other atlases up to 2999) and aparc.a2009s+aseg (11100-12175) are grey matter; the white matter
# parcels of wmparc (3000-4999, 5001, 5002 unsegmented) and of the a2009s atlas (13100-14175) white matter.
FREESURFER_RANGES = (
    (1000, 2999, GREY_MATTER),
    (11100, 12999, GREY_MATTER),
    (3000, 5002, WHITE_MATTER),
    (13100, 14999, WHITE_MATTER),
)
PRESETS = ("fast", "freesurfer")


@dataclass(frozen=True)
class LabelMap:
    """Label value -> class index (0..3, see the module docstring).

    ``classes`` names single values, ``ranges`` inclusive ``(low, high, class)`` runs of them; a value in
    neither gets ``default``, or is an error when ``default`` is None. ``name`` is the preset or file it came from.
    """

    name: str
    classes: dict[int, int]
    ranges: tuple[tuple[int, int, int], ...] = ()
    default: int | None = None

    def class_of(self, value: int) -> int | None:
        """The class index of one label value, or None if the map does not know it."""
        if value in self.classes:
            return self.classes[value]
        for low, high, label_class in self.ranges:
            if low <= value <= high:
                return label_class
        return self.default

    def apply(self, labels: np.ndarray, path: str | Path | None = None) -> np.ndarray:
        """Class indices (uint8, same shape) of a label array of whole numbers (any numeric dtype).

        Raises DataError naming ``path`` if ``labels`` holds values that are not whole numbers (a probability
        map rather than labels) or that the map does not know (up to five of them are named).
        """
        if not np.array_equal(labels, np.round(labels)):
            fractions = np.unique(labels[labels != np.round(labels)])[:3]
            shown = ", ".join(f"{value:g}" for value in fractions)
            raise DataError(f"label volume holds values that are not whole numbers ({shown}): labels, not "
                            "probabilities, are expected", path)
        values, inverse = np.unique(labels.astype(np.int64), return_inverse=True)
        found = [self.class_of(int(value)) for value in values]
        if unknown := [int(value) for value, label_class in zip(values, found, strict=True) if label_class is None]:
            shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
            raise DataError(f"label volume holds values that the {self.name} label map does not know ({shown})", path)
        return np.asarray(found, dtype=np.uint8)[inverse].reshape(labels.shape)


FAST = LabelMap("fast", {0: BACKGROUND, 1: CSF, 2: GREY_MATTER, 3: WHITE_MATTER})
FREESURFER = LabelMap("freesurfer", FREESURFER_CLASSES, FREESURFER_RANGES, default=GREY_MATTER)


def load_label_map(spec: str | Path | None) -> LabelMap:
    """The label map a ``--label-map`` value names: None or ``"fast"``, ``"freesurfer"``, or a JSON file's path.

    Raises ConfigError naming the file if it cannot be read, is not a JSON object, or has a key that is not a
    whole number or a value that is not one of :data:`MASK_CLASS_NAMES`.
    """
    if spec is None or str(spec) == "fast":
        return FAST
    if str(spec) == "freesurfer":
        return FREESURFER
    path = Path(spec)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the label map (not {' or '.join(PRESETS)}, nor a readable JSON file: "
                          f"{error})", path) from error
    if not isinstance(table, dict) or not table:
        raise ConfigError('a label map must be a JSON object {"<label value>": "<class>", ...}', path)
    classes = {}
    for key, name in table.items():
        try:
            value = int(key)
        except ValueError:
            raise ConfigError(f"label map key {key!r} is not a whole number", path) from None
        if name not in MASK_CLASS_NAMES:
            raise ConfigError(f"label map value {name!r} (for {key}) is not one of {', '.join(MASK_CLASS_NAMES)}", path)
        classes[value] = MASK_CLASS_NAMES.index(name)
    return LabelMap(str(path), classes)
