"""The ``<pkg>-export`` command of every task package: a run or checkpoint -> an exported folder.

``<pkg>-export RUN|CHECKPOINT --output DIR [--push-to-hub ORG/NAME] [--private] [--overwrite]``
reads the model (:func:`medcore.weights.sources.read_model_source`), asks the package's export
function for the folder's contents (tensors, config parts, model card), writes the folder
(:func:`medcore.weights.export.write_export`), prints its files and total size, and uploads it
when asked. A package needs its export function and two lines::

    # <pkg>/export.py
    def describe(source: ModelSource) -> ModelExport: ...
    main = export_main(KIND, describe, find_in_run)

    # <pkg>/cli.py
    export = export_command("<pkg>-export", "<pkg>.export:main")

The weights machinery is imported when the command runs, not when ``cli.py`` declares it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from medcore.cli.command import Command, Flag
from medcore.errors import UserError

if TYPE_CHECKING:
    from medcore.weights.sources import Describe, FindInRun, Kinds

EXPORT_FLAGS: tuple[Flag, ...] = (
    (
        "source",
        {
            "metavar": "RUN|CHECKPOINT",
            "help": "a run directory (its best model) or a checkpoint (.pt) it wrote",
        },
    ),
    (
        "--output",
        {
            "type": Path,
            "required": True,
            "metavar": "DIR",
            "help": "the folder to write (model.safetensors, config.json, README.md); "
            "absent or empty",
        },
    ),
    (
        "--push-to-hub",
        {
            "metavar": "ORG/NAME",
            "help": "then upload the folder to this Hugging Face model repository "
            "(needs a login and the network)",
        },
    ),
    (
        "--private",
        {"action": "store_true", "help": "create the hub repository private (with --push-to-hub)"},
    ),
    (
        "--overwrite",
        {"action": "store_true", "help": "replace a previous export of the same model at --output"},
    ),
)


def export_command(prog: str, run: str, description: str | None = None) -> Command:
    """The ``Command`` of a package's export script; ``run`` names its :func:`export_main`."""
    return Command(
        prog=prog,
        description=description
        or "Export a trained model as a Hugging Face model folder (safetensors, config, card).",
        run=run,
        flags=EXPORT_FLAGS,
    )


def export_main(
    kind: Kinds, describe: Describe, find_in_run: FindInRun | None = None
) -> Callable[[argparse.Namespace], int]:
    """The function an export ``Command`` runs, for a package's ``kind`` and export function."""

    def main(args: argparse.Namespace) -> int:
        return run_export(args, kind, describe, find_in_run)

    return main


def run_export(
    args: argparse.Namespace,
    kind: Kinds,
    describe: Describe,
    find_in_run: FindInRun | None = None,
) -> int:
    """Export ``args.source`` to ``args.output`` (see the module docstring); returns 0."""
    from medcore.report.model_card import format_size
    from medcore.report.tables import format_table
    from medcore.weights.export import check_can_push, export_files, push_to_hub, write_export
    from medcore.weights.sources import model_export, read_model_source

    if args.private and not args.push_to_hub:
        raise UserError("--private", "applies to the hub repository: use it with --push-to-hub")
    if args.push_to_hub:  # before any work: an upload that cannot happen fails first
        check_can_push(args.push_to_hub)
    source = read_model_source(args.source, kind, find_in_run=find_in_run)
    if source.exported:
        raise UserError(
            args.source,
            "already an exported model: load it as it is, or export its run or checkpoint",
        )
    export = model_export(source, describe)
    if not export.exported_from:
        export = dataclasses.replace(export, exported_from=source.path.name)
    if export.card is None or not export.card.metrics:
        where = "" if source.run_dir else f" ({source.path} is not inside its run directory)"
        print(f"note: the model card has no metrics{where}", file=sys.stderr)
    folder = write_export(export, args.output, overwrite=args.overwrite, repo_id=args.push_to_hub)
    files = export_files(folder)
    rows = [{"file": name, "size": format_size(size)} for name, size in files]
    rows.append({"file": "total", "size": format_size(sum(size for _, size in files))})
    print(f"exported {export.kind} from {source.path} to {folder}")
    print(format_table(rows))
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, private=args.private)
        print(f"uploaded to {args.push_to_hub}: {url}")
    return 0
