"""``binensemble-vote``: the soft vote of two or more models' probability files
(:func:`binensemble.ensemble.vote_files`), written as a label CSV and a probability CSV."""

from __future__ import annotations

import argparse

from binensemble.ensemble import decide, vote_files, write_predictions


def main(args: argparse.Namespace) -> int:
    ref, voted = vote_files(args.probs, args.weights)
    out = args.output
    pred, prob = write_predictions(out.parent, out.stem, ref.ids, voted, ref.classes, ref.targets)
    labels = decide(voted)
    print(
        f"voted {len(args.probs)} models on {len(ref.ids)} images: {int(labels.sum())} predicted "
        f"{ref.classes[1]}, {int((labels == 0).sum())} {ref.classes[0]}"
    )
    print(f"wrote {pred} and {prob}")
    return 0
