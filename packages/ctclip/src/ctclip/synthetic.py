"""The built-in demo dataset, written in the real CT-RATE formats.

NIfTI volumes (nibabel, real headers) of a chest phantom: varied voxel orientations (LPS, RAS,
permuted axes, inferior-to-superior and reverse), voxel spacings, and intensity storage (int16 with
the header's scl_slope/scl_inter, int16 whose slope/intercept are only in the metadata CSV, float32
HU). Findings are local structures (a nodule in a lung, fluid at a lung base, an enlarged heart, a
metal device, a consolidated lung region), so a model must look at the right place to see them. Reports
are written from the labels; labels and metadata CSVs have the CT-RATE columns.

World coordinates are RAS millimetres (+x patient's right, +y anterior, +z superior), origin at
the centre of the chest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctclip.findings import FINDINGS

# Findings that the demo phantom can show; the other 13 are always absent in the demo.
DEMO_FINDINGS: tuple[str, ...] = (
    "Lung nodule",
    "Pleural effusion",
    "Cardiomegaly",
    "Medical material",
    "Consolidation",
)
REPORT_ORDER = (
    "Medical material",
    "Cardiomegaly",
    "Lung nodule",
    "Consolidation",
    "Pleural effusion",
)
# Scans cycle through every combination of the demo findings in random order (a full factorial
# design): each finding has prevalence 1/2 and no two are correlated by chance, so a model
# cannot score one finding by recognising another.
_FACTORIAL = (
    np.array(np.meshgrid(*[[0, 1]] * len(DEMO_FINDINGS), indexing="ij"))
    .reshape(len(DEMO_FINDINGS), -1)
    .T
)
SOURCE_SHAPE = (32, 64, 64)  # slices, rows, columns of the demo's source volumes

_AXES = {
    "R": (0, 1.0),
    "L": (0, -1.0),
    "A": (1, 1.0),
    "P": (1, -1.0),
    "S": (2, 1.0),
    "I": (2, -1.0),
}
# Voxel-axis orientations of the source files (closest canonical of each is RAS).
ORIENTATIONS: tuple[str, ...] = ("LPS", "RAS", "LAS", "RPI", "PLS", "SRA")

METADATA_EXTRA = {
    "Manufacturer": ["PHANTOM CT"],
    "PatientSex": ["M", "F"],
    "PatientPosition": ["HFS", "FFS"],
    "RescaleType": ["HU"],
    "ConvolutionKernel": ["STANDARD", "LUNG"],
}


@dataclass
class Case:
    """The anatomy and findings of one scan (its reconstructions share them)."""

    labels: dict[str, int]
    seed: int


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float
) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def phantom_hu(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, case: Case, noise_seed: int
) -> np.ndarray:
    """Hounsfield units of the phantom at world points (x, y, z) in mm."""
    rng = np.random.default_rng(case.seed)
    lab = case.labels
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    a, b = rng.uniform(118, 138), rng.uniform(92, 106)
    body = _ellipse(x, y, 0, 0, a, b)
    hu[body] = -90.0  # subcutaneous fat
    hu[_ellipse(x, y, 0, 0, a - 10, b - 9)] = 40.0
    # Lungs taper towards the apex (superior).
    taper = np.clip(1.0 - 0.25 * (z + 50) / 100, 0.6, 1.1)
    lung_ax, lung_ay = rng.uniform(40, 46), rng.uniform(58, 66)
    lungs = []
    for side in (1.0, -1.0):
        lung = _ellipse(x, y, side * 0.47 * a, 2.0, lung_ax * taper, lung_ay * taper)
        lungs.append((side, lung))
        hu[lung] = -760.0
    # Heart: anterior, left of midline, roughly a sphere in the lower chest.
    heart_r = rng.uniform(46, 52) if lab["Cardiomegaly"] else rng.uniform(26, 31)
    hz = np.sqrt(np.clip(1.0 - ((z + 15) / (1.6 * heart_r)) ** 2, 0.0, 1.0))
    hu[_ellipse(x, y, -14, 30, heart_r * hz + 1e-3, heart_r * 0.85 * hz + 1e-3)] = 45.0
    hu[_ellipse(x, y, -18, -52, 11, 11)] = 50.0  # descending aorta
    hu[_ellipse(x, y, 0, -78, 15, 13)] = 650.0  # vertebral body
    hu[_ellipse(x, y, 0, -78, 5, 5)] = 20.0
    hu[_ellipse(x, y, 0, b - 14, 16, 6)] = 550.0  # sternum

    if lab["Pleural effusion"]:
        sides = [(s, m) for s, m in lungs if rng.random() < 0.7] or [lungs[0]]
        for _side, lung in sides:
            level = 2.0 - lung_ay * rng.uniform(0.15, 0.45)  # fluid settles posteriorly (supine)
            hu[lung & (y < level)] = 12.0
    if lab["Consolidation"]:
        # Airspace consolidation: a dense, soft-tissue-like region in the anterior part of a lung.
        side = rng.choice([1.0, -1.0])
        cx, cy = (
            side * 0.47 * a + rng.uniform(-0.2, 0.2) * lung_ax,
            2.0 + lung_ay * rng.uniform(0.25, 0.45),
        )
        rx, ry, cz = (
            lung_ax * rng.uniform(0.5, 0.8),
            lung_ay * rng.uniform(0.35, 0.5),
            rng.uniform(-20, 20),
        )
        region = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / 40.0) ** 2 <= 1.0
        hu[region & (hu < -500)] = -40.0
    if lab["Lung nodule"]:
        for _ in range(rng.integers(2, 4)):
            side = rng.choice([1.0, -1.0])
            cx = side * 0.47 * a + rng.uniform(-0.45, 0.45) * lung_ax
            cy = 2.0 + rng.uniform(-0.2, 0.5) * lung_ay
            cz, r = rng.uniform(-25, 25), rng.uniform(13, 18)
            hu[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r**2] = 60.0
    if lab["Medical material"]:
        # A pacemaker: a metal can under the left chest wall and a lead towards the heart.
        cz = rng.uniform(-10, 20)
        can = (np.abs(x + 0.55 * a) < 14) & (np.abs(y - (b - 24)) < 6) & (np.abs(z - cz) < 16)
        hu[can] = 3000.0
        lead = (np.abs(x + 0.3 * a) < 3.5) & (np.abs(y - 35) < 35) & (np.abs(z - cz) < 4)
        hu[lead & body] = 2500.0
    noise = np.random.default_rng(noise_seed).normal(0.0, 15.0, size=x.shape)
    return (hu + noise * (hu > -999)).astype(np.float32)


def voxel_affine(
    orientation: str,
    spacing: dict[int, float],
    shape: tuple[int, ...],
    rng: np.random.Generator,
    jitter_mm: float = 5.0,
) -> np.ndarray:
    """Affine of a grid whose voxel axes point along ``orientation`` (e.g. "LPS"), centred near 0."""
    affine = np.eye(4)
    for i, code in enumerate(orientation):
        world, sign = _AXES[code]
        affine[:3, i] = 0.0
        affine[world, i] = sign * spacing[world]
    centre = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre + rng.uniform(-jitter_mm, jitter_mm, size=3)
    return affine


def render(
    case: Case, orientation: str, spacing: dict[int, float], noise_seed: int, jitter_mm: float = 5.0
) -> tuple[np.ndarray, np.ndarray]:
    """(HU array on the voxel grid of ``orientation``, its affine)."""
    rng = np.random.default_rng(noise_seed)
    size = {0: SOURCE_SHAPE[2], 1: SOURCE_SHAPE[1], 2: SOURCE_SHAPE[0]}  # world axis -> samples
    shape = tuple(size[_AXES[c][0]] for c in orientation)
    affine = voxel_affine(orientation, spacing, shape, rng, jitter_mm)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(
        -1, 3
    )
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    hu = phantom_hu(xyz[:, 0], xyz[:, 1], xyz[:, 2], case, noise_seed).reshape(shape)
    return hu, affine


_POSITIVE = ("{F} is present.", "There is {f}.", "{F} is seen.")
_NEGATIVE = ("{F} is not present.", "No {f}.", "There is no {f}.")
_DETAIL = {
    "Lung nodule": "A {size} mm nodule is noted in the {side} lung.",
    "Pleural effusion": "Fluid is noted at the {side} lung base.",
    "Cardiomegaly": "The heart is enlarged.",
    "Medical material": "A cardiac pacemaker is in place.",
    "Consolidation": "Airspace opacity is seen in the {side} lung.",
}
_NORMAL = (
    "Trachea and both main bronchi are open.",
    "Mediastinal structures are within normal limits.",
    "Thoracic vertebrae are intact.",
    "The liver is of normal size.",
)


def write_report(labels: dict[str, int], rng: np.random.Generator) -> tuple[str, str]:
    """(findings text, impression text) describing ``labels`` in varied sentences.

    Every demo finding is mentioned, present or negated, in a fixed anatomical order (devices, heart,
    lungs, pleura) as structured reports are; a few other findings are negated at random.
    """
    sentences = []
    for finding in REPORT_ORDER:
        if labels[finding]:
            template = _POSITIVE[rng.integers(len(_POSITIVE))]
            sentences.append(template.format(F=finding, f=finding.lower()))
            if rng.random() < 0.3:
                side = rng.choice(["right", "left"])
                sentences.append(_DETAIL[finding].format(side=side, size=int(rng.integers(8, 20))))
        else:
            template = _NEGATIVE[rng.integers(len(_NEGATIVE))]
            sentences.append(template.format(F=finding, f=finding.lower()))
    others = [f for f in FINDINGS if f not in DEMO_FINDINGS]
    for finding in rng.choice(others, size=int(rng.integers(0, 2)), replace=False):
        sentences.append(f"No {finding.lower()}.")
    sentences.append(_NORMAL[rng.integers(len(_NORMAL))])
    findings_text = " ".join(sentences)
    present = [f.lower() for f in DEMO_FINDINGS if labels[f]]
    impression = ("Findings: " + ", ".join(present) + ".") if present else "No acute findings."
    return findings_text, impression


def _cases(split: str, n_volumes: int, rng: np.random.Generator) -> list[tuple[str, Case, int]]:
    """(volume name, case, reconstruction seed) with CT-RATE naming: <split>_<patient>_<scan>_<recon>."""
    out: list[tuple[str, Case, int]] = []
    patient = 0
    combos: list[np.ndarray] = []
    while len(out) < n_volumes:
        patient += 1
        for scan in "ab"[: int(rng.integers(1, 3))]:
            if not combos:
                combos = list(rng.permutation(_FACTORIAL))
            present = combos.pop()
            labels = {
                f: int(f in DEMO_FINDINGS and present[DEMO_FINDINGS.index(f)]) for f in FINDINGS
            }
            case = Case(labels=labels, seed=int(rng.integers(2**31)))
            for recon in range(1, int(rng.integers(1, 3)) + 1):
                if len(out) < n_volumes:
                    out.append(
                        (f"{split}_{patient}_{scan}_{recon}.nii.gz", case, int(rng.integers(2**31)))
                    )
    return out


def _write_nifti(
    path: Path, hu: np.ndarray, affine: np.ndarray, storage: int, slope: float, inter: float
) -> None:
    """Store HU as a scanner would: header-scaled int16, metadata-scaled int16, or float HU."""
    if storage == 2:
        img = nib.Nifti1Image(hu.astype(np.float32), affine)
    else:
        raw = np.round((hu - inter) / slope).astype(np.int16)
        img = nib.Nifti1Image(raw, affine)
        if storage == 0:
            img.header.set_slope_inter(slope, inter)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def generate_split(root: Path, split: str, n_volumes: int, seed: int) -> dict[str, pd.DataFrame]:
    """Write ``n_volumes`` NIfTI files under ``root/ct_volumes/<split>`` and return the CSV tables."""
    rng = np.random.default_rng(seed)
    vol_dir = root / "ct_volumes" / split
    vol_dir.mkdir(parents=True, exist_ok=True)
    reports, labels, metadata = [], [], []
    for idx, (name, case, recon_seed) in enumerate(_cases(split, n_volumes, rng)):
        vrng = np.random.default_rng(recon_seed)
        xy, zsp = round(float(vrng.uniform(4.6, 5.4)), 3), round(float(vrng.uniform(3.0, 3.6)), 3)
        orientation = ORIENTATIONS[idx % len(ORIENTATIONS)]
        hu, affine = render(case, orientation, {0: xy, 1: xy, 2: zsp}, recon_seed)
        storage = idx % 3  # 0: header slope/intercept, 1: metadata only, 2: float HU
        slope, inter = ((0.5 if idx % 2 else 1.0), -1024.0) if storage < 2 else (1.0, 0.0)
        _write_nifti(vol_dir / name, hu, affine, storage, slope, inter)
        findings_text, impression = write_report(case.labels, vrng)
        if vrng.random() < 0.15:
            impression = None  # some reports lack an impression (ctclip-impressions fills them)
        reports.append(
            {
                "VolumeName": name,
                "ClinicalInformation_EN": "Not given.",
                "Technique_EN": "Non-contrast chest CT in the axial plane.",
                "Findings_EN": findings_text,
                "Impressions_EN": impression,
            }
        )
        labels.append({"VolumeName": name, **case.labels})
        row = {
            "VolumeName": name,
            "XYSpacing": f"[{xy}, {xy}]",
            "ZSpacing": zsp,
            "RescaleSlope": slope,
            "RescaleIntercept": inter,
            "Rows": SOURCE_SHAPE[1],
            "Columns": SOURCE_SHAPE[2],
        }
        row.update({k: v[idx % len(v)] for k, v in METADATA_EXTRA.items()})
        row["PatientAge"] = f"{int(vrng.integers(30, 85)):03d}Y"
        metadata.append(row)
    return {
        "reports": pd.DataFrame(reports),
        "labels": pd.DataFrame(labels, columns=["VolumeName", *FINDINGS]),
        "metadata": pd.DataFrame(metadata),
    }


def generate_demo(root: Path, n_train: int = 160, n_valid: int = 60, seed: int = 0) -> Path:
    """Write the whole demo dataset (CT-RATE layout) into ``root``."""
    root = Path(root)
    csv_dir = root / "ct_rate"
    csv_dir.mkdir(parents=True, exist_ok=True)
    names = {
        "train": ("train_reports.csv", "train_predicted_labels.csv", "train_metadata.csv"),
        "valid": (
            "validation_reports.csv",
            "valid_predicted_labels.csv",
            "validation_metadata.csv",
        ),
    }
    for offset, (split, n) in enumerate((("train", n_train), ("valid", n_valid))):
        tables = generate_split(root, split, n, seed * 1000 + offset)
        for key, filename in zip(("reports", "labels", "metadata"), names[split], strict=True):
            tables[key].to_csv(csv_dir / filename, index=False)
    return root
