"""The CLIP BPE tokenizer (open_clip ships the vocabulary: no download) and report text selection."""

from __future__ import annotations

import math
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer

from ctclip.config import TextColumn

TEXT_COLUMNS = {
    "findings": ("Findings_EN",),
    "impressions": ("Impressions_EN",),
    "both": ("Findings_EN", "Impressions_EN"),
}


class Tokenizer:
    """Texts -> ``[n, context_length]`` token ids; truncation keeps the end-of-text token.

    The text tower pools at the end-of-text token (the highest id), so it must survive truncation;
    open_clip's SimpleTokenizer overwrites the last kept position with it.
    """

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 3:
            raise ValueError("context_length must be at least 3")
        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)
        self._encoded: dict[str, list[int]] = {}  # sentence -> BPE ids, see join()

    @property
    def sot_token_id(self) -> int:
        return self._tok.sot_token_id

    @property
    def eot_token_id(self) -> int:
        return self._tok.eot_token_id

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        return self._tok(texts, context_length=self.context_length)

    def length(self, text: str) -> int:
        """Tokens of ``text`` with its start and end tokens, before any truncation."""
        return len(self._tok.encode(text)) + 2

    def join(self, sentences: list[str]) -> torch.Tensor:
        """``self(" ".join(sentences))[0]``, from each sentence's BPE ids encoded once.

        The CLIP tokenizer splits on white space before BPE, so the ids of joined sentences are
        the sentences' ids one after the other; training draws sentence subsets of the same
        reports every epoch, and encoding is most of the loader's time (tested equal).
        """
        ids = [self._tok.sot_token_id]
        for sentence in sentences:
            encoded = self._encoded.get(sentence)
            if encoded is None:
                encoded = self._encoded[sentence] = self._tok.encode(sentence)
            ids.extend(encoded)
        ids.append(self._tok.eot_token_id)
        if len(ids) > self.context_length:  # truncated as open_clip does: the end token stays
            ids = ids[: self.context_length]
            ids[-1] = self._tok.eot_token_id
        row = torch.zeros(self.context_length, dtype=torch.long)
        row[: len(ids)] = torch.tensor(ids)
        return row

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        """The text of one row of token ids, without start/end/padding tokens."""
        ids = [int(t) for t in tokens if int(t) not in (0, self.sot_token_id, self.eot_token_id)]
        return self._tok.decode(ids).strip()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "context_length": self.context_length
        }  # workers rebuild instead of pickling the BPE tables

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["context_length"])


def clean_text(value: Any) -> str:
    """A report cell as text; NaN/None (a missing section) becomes the empty string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def report_text(row: dict[str, Any], column: TextColumn) -> str:
    """The text of a reports-CSV row for ``--text-column`` (findings, impressions or both)."""
    parts = [clean_text(row.get(c)) for c in TEXT_COLUMNS[column]]
    return " ".join(p for p in parts if p)
