"""Console entry points: ``ctretrieval-{preprocess,train,eval,index,search}``."""

from __future__ import annotations

from medcore.cli import run_cli


def preprocess(argv: list[str] | None = None) -> int:
    from ctretrieval.preprocess import main

    return run_cli(lambda: main(argv), "ctretrieval-preprocess")


def train(argv: list[str] | None = None) -> int:
    from ctretrieval.train import main

    return run_cli(lambda: main(argv), "ctretrieval-train")


def evaluate(argv: list[str] | None = None) -> int:
    from ctretrieval.evaluate import main

    return run_cli(lambda: main(argv), "ctretrieval-eval")


def index(argv: list[str] | None = None) -> int:
    from ctretrieval.index import index_main

    return run_cli(lambda: index_main(argv), "ctretrieval-index")


def search(argv: list[str] | None = None) -> int:
    from ctretrieval.index import search_main

    return run_cli(lambda: search_main(argv), "ctretrieval-search")
