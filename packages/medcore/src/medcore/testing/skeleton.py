"""The skeleton every task package keeps: the same module name for the same role.

A reader who knows one package finds their way in the other four: ``<pkg>.train:main`` is the
training command, ``<pkg>.model`` has ``KIND`` and ``build_model(cfg)``, and so on. Each
package's tests call :func:`skeleton_problems` on itself; an empty list means it keeps the shape.

- modules: ``cli`` (the command table only), ``config``, ``data``, ``model``, ``losses``,
  ``train``, ``evaluate``, ``predict``, ``synthetic`` (demo data in the real on-disk format);
  ``preprocess`` where the package has a preprocessing step;
- ``model.KIND``: the checkpoint identity, ``"<pkg>.<Name>"`` (a package with several
  architectures names the default or the family here, and lists the kinds its checkpoints are
  stored as beside it: ctretrieval's and histommnet's ``KINDS``, binensemble's
  ``MEMBER_KINDS``); ``model.build_model(cfg)``: one argument, the package's config;
- ``train``: ``main`` (the ``<pkg>-train`` command), ``make_step_fn``, ``make_evaluate_fn``;
- every command of ``cli`` runs ``<pkg>.<module>:main`` and is installed as the console script
  named by its ``prog``, and every console script of the package is such a command.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
from collections.abc import Mapping

ROLES = ("cli", "config", "data", "model", "losses", "train", "evaluate", "predict", "synthetic")
TRAIN_FUNCTIONS = ("main", "make_step_fn", "make_evaluate_fn")


def console_scripts(package: str) -> dict[str, str]:
    """``{script name: "module:attribute"}`` of the installed distribution ``package``."""
    dist = importlib.metadata.distribution(package)
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}


def _required_positional(fn: object) -> list[str]:
    params = inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def skeleton_problems(package: str, scripts: Mapping[str, str] | None = None) -> list[str]:
    """What ``package`` lacks of the skeleton (module docstring), one line each.

    ``scripts``: its console scripts (``{name: "module:attribute"}``); by default those of the
    installed distribution of the same name.
    """
    from medcore.cli.command import Command

    problems = [
        f"{package}.{role}: no such module"
        for role in ROLES
        if importlib.util.find_spec(f"{package}.{role}") is None
    ]
    if problems:
        return problems

    model = importlib.import_module(f"{package}.model")
    kind = getattr(model, "KIND", None)
    if not (isinstance(kind, str) and kind.startswith(f"{package}.")):
        problems.append(f"{package}.model.KIND: expected a string '{package}.<Name>', got {kind!r}")
    build = getattr(model, "build_model", None)
    if not callable(build):
        problems.append(f"{package}.model.build_model: missing")
    elif len(_required_positional(build)) != 1:
        problems.append(
            f"{package}.model.build_model: expected one argument (the config), got "
            f"({', '.join(_required_positional(build))})"
        )

    train = importlib.import_module(f"{package}.train")
    problems += [
        f"{package}.train.{name}: missing"
        for name in TRAIN_FUNCTIONS
        if not callable(getattr(train, name, None))
    ]

    cli = importlib.import_module(f"{package}.cli")
    commands = {name: c for name, c in vars(cli).items() if isinstance(c, Command)}
    for name, command in commands.items():
        module, _, function = command.run.partition(":")
        if function != "main" or not module.startswith(f"{package}."):
            problems.append(
                f"{package}.cli.{name}: runs {command.run}, not {package}.<module>:main"
            )
        elif importlib.util.find_spec(module) is None:
            problems.append(f"{package}.cli.{name}: runs {command.run}: no such module")
        elif not callable(getattr(importlib.import_module(module), "main", None)):
            problems.append(f"{package}.cli.{name}: {module} has no main")
        if not command.prog.startswith(f"{package}-"):
            problems.append(f"{package}.cli.{name}: prog {command.prog!r} is not {package}-<verb>")
    if f"{package}.train:main" not in {c.run for c in commands.values()}:
        problems.append(f"{package}.cli: no command runs {package}.train:main")

    installed = dict(console_scripts(package) if scripts is None else scripts)
    for script, target in installed.items():
        module, _, attribute = target.partition(":")
        command = commands.get(attribute) if module == f"{package}.cli" else None
        if command is None:
            problems.append(f"console script {script}: {target} is not a command of {package}.cli")
        elif command.prog != script:
            problems.append(f"console script {script}: its command's prog is {command.prog!r}")
    for name, command in commands.items():
        if command.prog not in installed:
            problems.append(f"{package}.cli.{name}: {command.prog} is not an installed script")
    return problems
