"""Console entry points ``histommnet-{train,analyze,gradcam}``: the commands and their flags only.

Each command is ``histommnet.<module>:run(args)`` (:class:`medcore.cli.command.Command`).
"""

from __future__ import annotations

from pathlib import Path

from medcore.cli.command import Command

MODELS = ("mmnet", "single", "concat")
# fmt: off
FOLDS = ("--folds", {"type": int, "help": "number of cross-validation folds (default 5)"},
         "cv.folds")
train = Command("histommnet-train", "patient-wise k-fold cross-validation of MMNet",
                "histommnet.crossval:run", [
    ("--model", {"choices": MODELS, "help": "model kind (default: mmnet)"}, "model.name"),
    FOLDS,
    ("--fold", {"type": int, "help": "run only this fold (0-based)"}, "cv.fold")], common=True)
analyze = Command("histommnet-analyze", "BreakHis dataset report and the cross-validation folds",
                  "histommnet.analyze:run", [
    FOLDS,
    ("--run", {"type": Path, "help": "a training run: report its config and saved folds"})],
    common=False)
gradcam = Command("histommnet-gradcam", "Grad-CAM heatmaps per magnification",
                  "histommnet.gradcam:run", [
    ("--checkpoint", {"type": Path, "required": True, "help": "a fold_<i>_best.pth"}),
    ("--patients", {"nargs": "+", "metavar": "ID",
                    "help": "patients in any BreakHis spelling: SOB_B_A_14-22549AB, "
                            "SOB_B_A-14-22549AB, 14-22549AB, 22549AB (14-22549: all its slides)"}),
    ("--num-patients", {"type": int, "default": 4, "help": "without --patients: how many"}),
    ("--draw", {"type": int, "default": 0, "help": "which evaluation draw of each patient"}),
    ("--target", {"choices": ("predicted", "benign", "malignant"), "default": "predicted"}),
    ("--threshold", {"type": float, "help": "P(malignant) cut-off (default: the fold's)"})],
    common=False)
# fmt: on

if __name__ == "__main__":  # torchrun --nproc_per_node=4 -m histommnet.cli [train flags]
    raise SystemExit(train())
