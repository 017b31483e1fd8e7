"""The BreakHis v1 tree: file-name parsing, folder checks and the per-patient index.

Layout::

    .../breast/{benign,malignant}/SOB/<tumor_type>/<patient_folder>/{40X,100X,200X,400X}/*.png
    file name: SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png   e.g. SOB_M_DC-14-2523-400-003.png
    patient folder: SOB_<B|M>_<type>_<year>-<slide>            e.g. SOB_M_DC_14-2523

Class, subtype, patient and magnification are read from both the path and the name; a file
whose name disagrees with its folders is skipped and named (its label would be ambiguous).

Items are patient folders. For splitting, folders are grouped by patient id ``<year>-<digits>``:
BreakHis has folders whose slide ids differ only by a letter suffix (``14-22549AB``,
``14-22549G``) or that appear under two tumour types, and these must never straddle folds.

A patient is spelled several ways in BreakHis and the papers using it: the folder
``SOB_B_A_14-22549AB``, the file-name prefix ``SOB_B_A-14-22549AB``, ``14-22549AB`` and
``22549AB``. :func:`parse_patient` reads all of them (and a whole file name) into one
:class:`PatientName`; folder checks and ``--patients`` look-ups go through it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medcore.errors import DataError
from medcore.io import MAX_IMAGE_PIXELS

CLASSES = ("benign", "malignant")
# (code in file names, folder name, class index)
SUBTYPES = (
    ("A", "adenosis", 0),
    ("F", "fibroadenoma", 0),
    ("PT", "phyllodes_tumor", 0),
    ("TA", "tubular_adenoma", 0),
    ("DC", "ductal_carcinoma", 1),
    ("LC", "lobular_carcinoma", 1),
    ("MC", "mucinous_carcinoma", 1),
    ("PC", "papillary_carcinoma", 1),
)
SUBTYPE_CODES = tuple(code for code, _, _ in SUBTYPES)
SUBTYPE_NAMES = tuple(name for _, name, _ in SUBTYPES)
_CODE_TO_INDEX = {code: i for i, code in enumerate(SUBTYPE_CODES)}
_FOLDER_TO_INDEX = {name: i for i, name in enumerate(SUBTYPE_NAMES)}
ALL_MAGNIFICATIONS = ("40X", "100X", "200X", "400X")

_NAME = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<type>[A-Z]+)-(?P<year>\d+)-(?P<slide>[0-9A-Za-z]+)-(?P<mag>\d+)-(?P<seq>\d+)\.png$",
    re.IGNORECASE,
)
_NAME_FORMAT = "SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png"
# A patient: the folder (``SOB_B_A_14-22549AB``), the file-name prefix (``SOB_B_A-14-22549AB``),
# or the slide with or without its year (``14-22549AB``, ``22549AB``).
_PATIENT = re.compile(
    r"^(?:SOB[_-](?P<cls>[BM])[_-](?P<type>[A-Z]+)[_-])?(?:(?P<year>\d+)-)?(?P<slide>[0-9A-Z]+)$",
    re.IGNORECASE,
)
_PATIENT_FORMAT = (
    "SOB_<B|M>_<type>_<year>-<slide>, SOB_<B|M>_<type>-<year>-<slide>, <year>-<slide> or <slide>"
)


def _subtype_of(code: str, label: int, where: str) -> int:
    """The subtype index of tumour ``code`` (a file-name code such as ``DC``) of class ``label``."""
    code = code.upper()
    if code not in _CODE_TO_INDEX:
        raise DataError(where, f"unknown tumour type {code!r} (known: {', '.join(SUBTYPE_CODES)})")
    subtype = _CODE_TO_INDEX[code]
    if SUBTYPES[subtype][2] != label:
        raise DataError(where, f"tumour type {code} is not {CLASSES[label]}")
    return subtype


@dataclass(frozen=True)
class PatientName:
    """A BreakHis patient as spelled somewhere; parts the spelling leaves out are None.

    ``slide`` is upper case (``22549AB``): its leading digits number the patient, a letter
    suffix names one of that patient's slides (folders).
    """

    label: int | None
    subtype: int | None
    year: str | None
    slide: str

    @property
    def digits(self) -> str:
        return re.match(r"\d*", self.slide).group(0) or self.slide

    @property
    def folder(self) -> str:
        """The patient folder name (every part must be known)."""
        return f"SOB_{'BM'[self.label]}_{SUBTYPE_CODES[self.subtype]}_{self.year}-{self.slide}"

    @property
    def patient_id(self) -> str:
        """The unit of leak-free splits: ``<year>-<digits>`` (all slides of one patient)."""
        return f"{self.year}-{self.digits}"

    def matches(self, other: PatientName) -> bool:
        """Whether ``other`` (a folder's full name) is one this spelling names: every part
        given here agrees, and a slide without letters names all the patient's slides."""
        given = [(self.label, other.label), (self.subtype, other.subtype), (self.year, other.year)]
        if any(mine is not None and mine != theirs for mine, theirs in given):
            return False
        return self.slide in (other.slide, other.digits)


def parse_patient(spelling: str) -> PatientName:
    """Read any BreakHis spelling of a patient (see :data:`_PATIENT`, or a whole image file
    name), case-insensitively; DataError if it is none of them."""
    text = spelling.strip()
    if text.lower().endswith(".png"):
        return parse_name(Path(text).name).patient
    m = _PATIENT.match(text)
    if m is None:
        raise DataError(spelling, f"not a BreakHis patient ({_PATIENT_FORMAT})")
    label = subtype = None
    if m["cls"]:
        label = 0 if m["cls"].upper() == "B" else 1
        subtype = _subtype_of(m["type"], label, spelling)
    return PatientName(label, subtype, m["year"], m["slide"].upper())


@dataclass(frozen=True)
class ParsedName:
    label: int
    subtype: int
    year: str
    slide: str
    magnification: str
    seq: int

    @property
    def patient(self) -> PatientName:
        return PatientName(self.label, self.subtype, self.year, self.slide.upper())

    @property
    def patient_folder(self) -> str:
        return self.patient.folder

    @property
    def patient_id(self) -> str:
        return self.patient.patient_id


def parse_name(name: str) -> ParsedName:
    """Parse a BreakHis file name; DataError if it does not follow the naming scheme."""
    m = _NAME.match(name)
    if m is None:
        raise DataError(name, f"file name does not match {_NAME_FORMAT}")
    label = 0 if m["cls"].upper() == "B" else 1
    subtype = _subtype_of(m["type"], label, name)
    return ParsedName(label, subtype, m["year"], m["slide"], f"{int(m['mag'])}X", int(m["seq"]))


@dataclass(frozen=True)
class ImageRecord:
    path: str
    label: int
    subtype: int
    patient_folder: str
    patient_id: str
    magnification: str


def parse_path(path: str | Path) -> ImageRecord:
    """Read an image's labels from its path and name; DataError on any disagreement."""
    path = Path(path)
    parts = path.parts
    if len(parts) < 6:
        raise DataError(
            path, "not inside a BreakHis tree (<class>/SOB/<tumor_type>/<patient>/<mag>/<file>)"
        )
    class_dir, sob_dir, type_dir, patient_dir, mag_dir = parts[-6:-1]
    if class_dir.lower() not in CLASSES or sob_dir.upper() != "SOB":
        raise DataError(
            path, "not inside a BreakHis tree (<class>/SOB/<tumor_type>/<patient>/<mag>/<file>)"
        )
    parsed = parse_name(path.name)
    folder_label = CLASSES.index(class_dir.lower())
    folder_subtype = _FOLDER_TO_INDEX.get(type_dir.lower())
    problems = []
    if parsed.label != folder_label:
        problems.append(f"name says {CLASSES[parsed.label]}, folder says {class_dir}")
    if folder_subtype is None:
        problems.append(f"unknown tumour type folder {type_dir!r}")
    elif folder_subtype != parsed.subtype:
        problems.append(f"name says {SUBTYPE_NAMES[parsed.subtype]}, folder says {type_dir}")
    if mag_dir.upper() != parsed.magnification:
        problems.append(f"name says {parsed.magnification}, folder says {mag_dir}")
    if _folder_name(patient_dir) != parsed.patient:
        problems.append(f"name says patient {parsed.patient_folder}, folder says {patient_dir}")
    if problems:
        raise DataError(path, "; ".join(problems))
    return ImageRecord(
        str(path),
        parsed.label,
        parsed.subtype,
        patient_dir,
        parsed.patient_id,
        parsed.magnification,
    )


def _folder_name(folder: str) -> PatientName | None:
    try:
        return parse_patient(folder)
    except DataError:
        return None


def image_problem(path: Path) -> str | None:
    """None if ``path`` is a complete PNG Pillow can read, else why not (no pixels decoded)."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged below
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    return (
                        f"image header claims {img.width}x{img.height} pixels; refusing to "
                        "decode (decompression bomb guard)"
                    )
                img.verify()  # checks the chunk structure and CRCs: catches truncated files
    except Image.DecompressionBombError:  # not an OSError: Pillow refuses before we can look
        return (
            "image header claims an implausible size; refusing to decode (decompression bomb guard)"
        )
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return (
            f"cannot decode image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        )
    return None


@dataclass
class Patient:
    """One patient folder: its labels and its image paths per magnification."""

    key: str  # the patient folder name
    patient_id: str  # the group used for leak-free splits
    label: int
    subtype: int
    images: dict[str, list[str]]
    filled_from: dict[str, str] = field(default_factory=dict)  # missing magnification -> source

    def counts(self, magnifications: Sequence[str]) -> list[int]:
        return [len(self.images[m]) for m in magnifications]


@dataclass
class BreakHisIndex:
    patients: list[Patient]
    skipped: list[tuple[str, str]]  # (path or patient, why)
    images: list[ImageRecord]


def find_patients(spelling: str, patients: Sequence[Patient]) -> list[Patient]:
    """The patient folders a BreakHis spelling names (:func:`parse_patient`), case-insensitive.

    ``14-22549AB``, ``22549AB``, ``SOB_B_A_14-22549AB`` and ``SOB_B_A-14-22549AB`` name that
    folder; ``14-22549`` names every folder of the patient. LookupError (its message naming
    the close candidates) when the spelling names no folder, or folders of two patients.
    """
    names = {p.key: parse_patient(p.key) for p in patients}
    try:
        wanted = parse_patient(spelling)
    except DataError as exc:
        raise LookupError(f"{exc.why}{_candidates(spelling, patients)}") from None
    found = [p for p in patients if wanted.matches(names[p.key])]
    if not found:
        raise LookupError(f"no such patient in the data{_candidates(spelling, patients)}")
    ids = sorted({p.patient_id for p in found})
    if len(ids) > 1:
        shown = ", ".join(p.key for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise LookupError(
            f"ambiguous: names {len(ids)} patients ({shown}); give the year or the folder name"
        )
    return found


def _candidates(spelling: str, patients: Sequence[Patient]) -> str:
    """``"; close: A, B"``: folders of the spelled patient number, else folders whose spellings
    resemble ``spelling``; else some examples."""
    try:
        digits = parse_patient(spelling).digits
    except DataError:
        digits = None
    keys = [p.key for p in patients if parse_patient(p.key).digits == digits]
    if not keys:
        spellings: dict[str, str] = {}
        for p in patients:
            name = parse_patient(p.key)
            for form in (p.key, f"{name.year}-{name.slide}", name.slide):
                spellings.setdefault(form.upper(), p.key)
        close = difflib.get_close_matches(spelling.strip().upper(), list(spellings), n=8)
        keys = list(dict.fromkeys(spellings[c] for c in close))
    if keys:
        return f"; close: {', '.join(keys[:5])}"
    return f"; e.g. {', '.join(p.key for p in patients[:5])}"


def _report(what: str, why: str) -> None:
    print(f"skip {what}: {why}", file=sys.stderr)


def nearest_magnification(missing: str, available: Sequence[str]) -> str:
    order = ALL_MAGNIFICATIONS
    pos = order.index(missing)
    # Ties go to the lower magnification: it shows more tissue context.
    return min(available, key=lambda m: (abs(order.index(m) - pos), order.index(m)))


def fill_magnifications(
    patient: Patient, magnifications: Sequence[str], missing: str = "nearest"
) -> str | None:
    """Complete ``patient.images`` where a magnification has no image, as
    ``data.missing_magnification`` says: ``nearest`` fills it from the nearest available one
    (a ``note:`` line names the patient); ``skip`` (or no image at all) returns why the patient
    is left out. None: the patient is complete."""
    available = [m for m in magnifications if patient.images.get(m)]
    absent = [m for m in magnifications if not patient.images.get(m)]
    if not absent:
        return None
    if not available:
        return "no readable image at any magnification"
    if missing == "skip":
        return f"no images at {', '.join(absent)} (data.missing_magnification=skip)"
    for m in absent:
        source = nearest_magnification(m, available)
        patient.images[m] = list(patient.images[source])
        patient.filled_from[m] = source
    fills = ", ".join(f"{m} from {s}" for m, s in patient.filled_from.items())
    print(f"note: patient {patient.key}: missing magnification filled ({fills})", file=sys.stderr)
    return None


def scan_breakhis(
    data_dir: str | Path,
    magnifications: Sequence[str] = ALL_MAGNIFICATIONS,
    missing: str = "nearest",
    check_images: bool = True,
    verbose: bool = True,
) -> BreakHisIndex:
    """Index a BreakHis tree into patients; bad files and incomplete patients are named skips.

    Raises DataError when nothing usable is left or a class has no patient.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(root, "not a directory" if root.exists() else "data directory not found")
    unknown = [m for m in magnifications if m not in ALL_MAGNIFICATIONS]
    if unknown or not magnifications:
        raise DataError(
            "data.magnifications", f"must be a non-empty subset of {', '.join(ALL_MAGNIFICATIONS)}"
        )
    report = _report if verbose else (lambda what, why: None)
    skipped: list[tuple[str, str]] = []
    records: list[ImageRecord] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(".png"):
                continue
            path = Path(dirpath) / name
            try:
                record = parse_path(path)
            except DataError as exc:
                skipped.append((str(path), exc.why))
                report(str(path), exc.why)
                continue
            if record.magnification not in magnifications:
                continue
            if check_images and (why := image_problem(path)) is not None:
                skipped.append((str(path), why))
                report(str(path), why)
                continue
            records.append(record)

    grouped: dict[str, list[ImageRecord]] = {}
    for record in records:
        grouped.setdefault(record.patient_folder, []).append(record)
    patients: list[Patient] = []
    for key in sorted(grouped):
        recs = grouped[key]
        images = {m: sorted(r.path for r in recs if r.magnification == m) for m in magnifications}
        patient = Patient(key, recs[0].patient_id, recs[0].label, recs[0].subtype, images)
        why = fill_magnifications(patient, magnifications, missing)
        if why is not None:
            skipped.append((key, why))
            report(f"patient {key}", why)
            continue
        patients.append(patient)

    if not patients:
        raise DataError(
            root,
            "no usable BreakHis images found (expected <class>/SOB/<tumor_type>/<patient>/"
            f"<{'|'.join(magnifications)}>/{_NAME_FORMAT})",
        )
    for label, name in enumerate(CLASSES):
        if not any(p.label == label for p in patients):
            raise DataError(root, f"no {name} patient found: both classes are needed")
    if skipped and verbose:
        print(f"skipped {len(skipped)} item(s) while indexing {root}", file=sys.stderr)
    return BreakHisIndex(patients, skipped, records)


def draws_per_patient(
    count: int,
    base_images: int = 3,
    volume_bounds: Sequence[int] = (15, 30),
    utilization: Sequence[float] = (0.60, 0.40, 0.25),
    cap: int | None = None,
) -> int:
    """Training draws of a patient with ``count`` images per magnification in one epoch.

    Low-volume patients (<= 15) use ~60% of their images, medium (16..30) ~40%, high (> 30)
    ~25%, and never fewer than ``base_images`` draws.
    """
    low, high = volume_bounds
    fraction = (
        utilization[0] if count <= low else utilization[1] if count <= high else utilization[2]
    )
    n = max(base_images, math.ceil(fraction * count))
    return min(n, cap) if cap else n
