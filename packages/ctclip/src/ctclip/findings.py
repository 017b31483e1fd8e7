"""The 18 CT-RATE findings (in the column order of ``*_predicted_labels.csv``) and prompt templates."""

from __future__ import annotations

FINDINGS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

# Zero-shot: a positive and a negative sentence per finding; a softmax over the pair gives P(present).
POSITIVE_TEMPLATE = "{finding} is present."
NEGATIVE_TEMPLATE = "{finding} is not present."


def prompt_pairs(findings: tuple[str, ...] | list[str] = FINDINGS) -> list[tuple[str, str]]:
    """(positive, negative) prompt of each finding, in order."""
    return [
        (POSITIVE_TEMPLATE.format(finding=f), NEGATIVE_TEMPLATE.format(finding=f)) for f in findings
    ]
