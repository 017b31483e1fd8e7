"""Shared fixtures: tiny configs of the real classes and a tiny demo dataset on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctclip.config import ModelConfig
from ctclip.preprocess import run_preprocess
from ctclip.synthetic import generate_demo

TINY_SHAPE = (8, 28, 28)
# `--set` overrides that shrink ctclip-train to a tiny config.
TINY_SETS = [
    "model.backbone_overrides={depth: 1, embed_dim: 32, num_heads: 2}",
    "model.image_size=28",
    "model.fusion_depth=1",
    "model.fusion_heads=2",
    "model.embed_dim=16",
    "model.text_width=32",
    "model.text_heads=2",
    "model.text_layers=1",
    "model.context_length=32",
    "data.demo_train_volumes=8",
    "data.demo_valid_volumes=6",
    "data.demo_target_shape=[8, 28, 28]",
    "trainer.batch_size=4",
    "validation.batch_size=4",
    "validation.n_boot=20",
]


def tiny_model_config(**changes) -> ModelConfig:
    base = dict(
        dinov2_model_name="dinov2_vits14",
        backbone_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2},
        image_size=28,
        fusion_depth=1,
        fusion_heads=2,
        embed_dim=16,
        context_length=32,
        text_width=32,
        text_heads=2,
        text_layers=1,
        slice_chunk_size=64,
        pretrained=False,
        grad_checkpointing=False,
    )
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def tiny_sets() -> list[str]:
    """``--set`` arguments for a tiny ctclip-train (plus any extra overrides)."""
    return [arg for item in TINY_SETS for arg in ("--set", item)]


@pytest.fixture
def tiny_cfg():
    """Factory of tiny model configs: ``tiny_cfg(image_size=42)``."""
    return tiny_model_config


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A small CT-RATE-layout dataset (NIfTI + CSVs) preprocessed to ``ct_volumes.h5``."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, n_train=8, n_valid=6, seed=3)
    csv = root / "ct_rate"
    run_preprocess(
        root / "ct_volumes",
        root / "ct_volumes.h5",
        [csv / "train_metadata.csv", csv / "validation_metadata.csv"],
        TINY_SHAPE,
        num_workers=0,
        show_progress=False,
    )
    return root


# The columns of CT-RATE's metadata tables (dataset/metadata/{train,validation}_metadata.csv),
# in the download's order.
CTRATE_METADATA_COLUMNS = [
    "VolumeName",
    "Manufacturer",
    "SeriesDescription",
    "ManufacturerModelName",
    "PatientSex",
    "PatientAge",
    "ReconstructionDiameter",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "GantryDetectorTilt",
    "TableHeight",
    "RotationDirection",
    "ExposureTime",
    "XRayTubeCurrent",
    "Exposure",
    "FilterType",
    "GeneratorPower",
    "FocalSpots",
    "ConvolutionKernel",
    "PatientPosition",
    "RevolutionTime",
    "SingleCollimationWidth",
    "TotalCollimationWidth",
    "TableSpeed",
    "TableFeedPerRotation",
    "SpiralPitchFactor",
    "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient",
    "ExposureModulationType",
    "CTDIvol",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "XYSpacing",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "NumberofSlices",
    "ZSpacing",
    "StudyDate",
]
# How a volume's HU are stored, as CT-RATE's releases and scanners do:
# (stored = (HU - intercept) / slope, header scl_slope/scl_inter or None, metadata slope/intercept)
STORAGES = {
    "raw": ((1.0, -1024.0), None, (1.0, -1024.0)),  # first release: unscaled header
    "raw8192": ((1.0, -8192.0), None, (1.0, -8192.0)),  # an intercept of -8192 in the table
    "hu": ((1.0, 0.0), None, (1.0, -1024.0)),  # corrected release: HU; the table unchanged
    "hu_header": ((1.0, 0.0), (1.0, 0.0), (1.0, -1024.0)),  # ... with scl_slope 1, scl_inter 0
    "scaled": ((0.5, -1024.0), (0.5, -1024.0), (0.5, -1024.0)),  # the header scales
}


def write_ctrate_volume(path: Path, storage: str, case, seed: int, xy: float, z: float) -> None:
    """One phantom volume written by nibabel as CT-RATE stores it (LPS voxel axes)."""
    import nibabel as nib
    import numpy as np

    from ctclip.synthetic import render

    hu, affine = render(case, "LPS", {0: xy, 1: xy, 2: z}, noise_seed=seed, jitter_mm=0.0)
    (slope, inter), header, _ = STORAGES[storage]
    img = nib.Nifti1Image(np.round((np.round(hu) - inter) / slope).astype(np.int16), affine)
    if header is not None:
        img.header.set_slope_inter(*header)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def metadata_row(name: str, storage: str, xy: float, z: float, slices: int) -> dict:
    """A metadata row with every CT-RATE column (XYSpacing as the string "[x, y]")."""
    slope, inter = STORAGES[storage][2]
    row = dict.fromkeys(CTRATE_METADATA_COLUMNS, "")
    row.update(
        VolumeName=name, Manufacturer="PHANTOM CT", SeriesDescription="CHEST",
        PatientSex="F", PatientAge="054Y", ConvolutionKernel="B", PatientPosition="HFS",
        ImageOrientationPatient="[1, 0, 0, 0, 1, 0]", SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2", Rows=64, Columns=64, XYSpacing=f"[{xy}, {xy}]",
        RescaleIntercept=inter, RescaleSlope=slope, RescaleType="HU", NumberofSlices=slices,
        ZSpacing=z, StudyDate=20210427,
    )  # fmt: skip
    return row


def write_ctrate_download(
    root: Path,
    storage: str | list[str] = "raw",
    patients: dict[str, int] | None = None,
    fixed: bool = False,
    cells: dict[str, dict] | None = None,
) -> Path:
    """A CT-RATE download under ``root`` as the Hugging Face dataset repository lays it out:
    ``dataset/{train,valid}/<split>_<N>/<split>_<N>_<scan>/<split>_<N>_<scan>_<k>.nii.gz`` (or
    ``{train,valid}_fixed``), ``dataset/metadata``, ``dataset/radiology_text_reports`` and
    ``dataset/multi_abnormality_labels`` with their CSV names and columns.

    ``storage``: one of :data:`STORAGES` for every volume, or a list cycled through.
    ``patients``: patients per split. ``cells``: metadata cells to overwrite, by VolumeName.
    """
    import numpy as np
    import pandas as pd

    from ctclip.findings import FINDINGS
    from ctclip.synthetic import DEMO_FINDINGS, SOURCE_SHAPE, Case, write_report

    patients = patients or {"train": 3, "valid": 6}
    storages = [storage] if isinstance(storage, str) else list(storage)
    dataset = root / "dataset"
    rng = np.random.default_rng(7)
    index = 0
    for split, n in patients.items():
        reports, labels, metadata = [], [], []
        for patient in range(1, n + 1):
            for scan in "ab"[: 1 + patient % 2]:
                present = rng.integers(0, 2, len(DEMO_FINDINGS))
                case_labels = {f: 0 for f in FINDINGS}
                case_labels.update(zip(DEMO_FINDINGS, map(int, present), strict=True))
                case = Case(labels=case_labels, seed=int(rng.integers(2**31)))
                findings, impression = write_report(case_labels, rng)
                for recon in range(1, 2 + (patient % 3 == 0)):
                    name = f"{split}_{patient}_{scan}_{recon}.nii.gz"
                    kind = storages[index % len(storages)]
                    index += 1
                    folder = dataset / (f"{split}_fixed" if fixed else split)
                    path = folder / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / name
                    write_ctrate_volume(path, kind, case, index, xy=5.0, z=3.0)
                    reports.append({
                        "VolumeName": name, "ClinicalInformation_EN": "Not given.",
                        "Technique_EN": "Non-contrast chest CT.", "Findings_EN": findings,
                        "Impressions_EN": impression,
                    })  # fmt: skip
                    labels.append({"VolumeName": name, **case_labels})
                    row = metadata_row(name, kind, 5.0, 3.0, SOURCE_SHAPE[0])
                    row.update((cells or {}).get(name, {}))
                    metadata.append(row)
        stem = "validation" if split == "valid" else "train"
        tables = {
            f"radiology_text_reports/{stem}_reports.csv": pd.DataFrame(reports),
            f"multi_abnormality_labels/{split}_predicted_labels.csv": pd.DataFrame(
                labels, columns=["VolumeName", *FINDINGS]
            ),
            f"metadata/{stem}_metadata.csv": pd.DataFrame(
                metadata, columns=CTRATE_METADATA_COLUMNS
            ),
        }
        for rel, frame in tables.items():
            (dataset / rel).parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(dataset / rel, index=False)
    (root / "README.md").write_text("# CT-RATE (test copy)\n")
    return root


@pytest.fixture(scope="session")
def ctrate_files():
    """The CT-RATE writers of this module: ``.download(root, storage=..., patients=...,
    fixed=..., cells=...)`` (returns the root), ``.volume(path, storage, case, seed, xy, z)``,
    ``.metadata_row(name, storage, xy, z, slices)`` and ``.storages``."""
    from types import SimpleNamespace

    return SimpleNamespace(
        download=write_ctrate_download,
        volume=write_ctrate_volume,
        metadata_row=metadata_row,
        storages=STORAGES,
    )
