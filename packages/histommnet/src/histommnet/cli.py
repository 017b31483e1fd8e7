"""Console entry points ``histommnet-{train,analyze,gradcam,export,predict}``: the commands and
their flags only.

Each command is ``histommnet.<module>:main(args)``; see :class:`medcore.cli.command.Command`.
"""

from __future__ import annotations

from pathlib import Path

from medcore.cli.command import Command
from medcore.cli.export import EXPORT_FLAGS
from medcore.runtime.device import DEVICE_CHOICES

MODELS = ("mmnet", "single", "concat")
# fmt: off
FOLDS = ("--folds", {"type": int, "help": "number of cross-validation folds (default 5)"},
         "cv.folds")
train = Command("histommnet-train", "patient-wise k-fold cross-validation of MMNet",
                "histommnet.train:main", [
    ("--model", {"choices": MODELS, "help": "model kind (default: mmnet)"}, "model.name"),
    FOLDS,
    ("--fold", {"type": int, "help": "run only this fold (0-based)"}, "cv.fold")], common=True)
analyze = Command("histommnet-analyze", "BreakHis dataset report and the cross-validation folds",
                  "histommnet.analyze:main", [
    FOLDS,
    ("--run", {"type": Path, "help": "a training run: report its config and saved folds"})],
    common=False)
gradcam = Command("histommnet-gradcam", "Grad-CAM heatmaps per magnification",
                  "histommnet.gradcam:main", [
    ("--checkpoint", {"type": Path, "required": True, "help": "a fold_<i>_best.pth"}),
    ("--patients", {"nargs": "+", "metavar": "ID",
                    "help": "patients in any BreakHis spelling: SOB_B_A_14-22549AB, "
                            "SOB_B_A-14-22549AB, 14-22549AB, 22549AB (14-22549: all its slides)"}),
    ("--num-patients", {"type": int, "default": 4, "help": "without --patients: how many"}),
    ("--draw", {"type": int, "default": 0, "help": "which evaluation draw of each patient"}),
    ("--target", {"choices": ("predicted", "benign", "malignant"), "default": "predicted"}),
    ("--threshold", {"type": float, "help": "P(malignant) cut-off (default: the fold's)"})],
    common=False)
export = Command("histommnet-export", "Export one fold of a run as a Hugging Face model folder "
                 "(safetensors, config, card)", "histommnet.export:main", [
    *EXPORT_FLAGS,
    ("--fold", {"type": int, "help": "the run's fold to export (default: the best by validation)"})])
predict = Command("histommnet-predict", "P(malignant) of new patients' folders (40X/100X/200X/400X)",
                  "histommnet.predict:main", [
    ("patients", {"type": Path, "nargs": "+", "metavar": "FOLDER",
                  "help": "patient folders, or folders holding them (a BreakHis tree too)"}),
    ("--model", {"required": True, "metavar": "RUN|CHECKPOINT|FOLDER|hf-hub:ORG/NAME",
                 "help": "a run directory (its best fold), a fold_<i>_best.pth, an export"}),
    ("--fold", {"type": int, "help": "with a run directory: this fold's model"}),
    ("--output", {"type": Path, "default": Path("predictions.csv"),
                  "help": "per-patient CSV (default: predictions.csv)"}),
    ("--images-output", {"type": Path,
                         "help": "per-draw CSV (default: <output stem>_images.csv)"}),
    ("--device", {"choices": DEVICE_CHOICES, "default": "auto"}),
    ("--batch-size", {"type": int, "default": 32})])
# fmt: on

if __name__ == "__main__":  # torchrun --nproc_per_node=4 -m histommnet.cli [train flags]
    raise SystemExit(train())
