"""The CLIP BPE tokenizer and report text selection."""

from __future__ import annotations

import math

import torch

from ctclip.text import Tokenizer, report_text


def test_tokenizer_round_trip_and_padding():
    tok = Tokenizer(context_length=32)
    text = "a 12 mm nodule is noted in the right lung."
    ids = tok(text)
    assert ids.shape == (1, 32) and ids.dtype == torch.long
    assert ids[0, 0] == tok.sot_token_id
    end = int((ids[0] == tok.eot_token_id).nonzero()[0])
    assert (ids[0, end + 1 :] == 0).all()
    # CLIP's BPE splits digits and punctuation into their own tokens; decoding spaces them out,
    # and encoding the decoded text gives the same ids back.
    assert tok.decode(ids[0]) == "a 1 2 mm nodule is noted in the right lung ."
    torch.testing.assert_close(tok(tok.decode(ids[0])), ids)
    assert tok.decode(tok("Pleural Effusion is present")[0]) == "pleural effusion is present"


def test_truncation_keeps_the_end_token():
    tok = Tokenizer(context_length=8)
    ids = tok(["one two three four five six seven eight nine ten", "short"])
    assert ids[0, -1] == tok.eot_token_id and ids[0].argmax() == 7  # the text tower pools at argmax
    assert tok.decode(ids[0]) == "one two three four five six"
    assert ids[1].argmax() == 2


def test_report_text_columns_and_missing_sections():
    row = {"Findings_EN": "Lung nodule is present.", "Impressions_EN": math.nan}
    assert report_text(row, "findings") == "Lung nodule is present."
    assert report_text(row, "impressions") == ""
    assert (
        report_text({**row, "Impressions_EN": "Nodule."}, "both")
        == "Lung nodule is present. Nodule."
    )


def test_sentence_sampling_keeps_sentence_order(tiny_demo):
    from ctclip.data import CTReportDataset, split_sentences

    report = "Lung nodule is present. No pleural effusion. The heart is enlarged. Trachea is open."
    assert split_sentences(report)[1] == "No pleural effusion."
    name = "train_1_a_1.nii.gz"
    ds = CTReportDataset(tiny_demo / "ct_volumes.h5", {name: report}, [name], Tokenizer(77), True)
    torch.manual_seed(0)
    seen = {ds.text(name) for _ in range(200)}
    sentences = split_sentences(report)
    for text in seen:
        parts = split_sentences(text)
        assert parts == sorted(parts, key=sentences.index)  # a subset, in report order
    assert report in seen and "Lung nodule is present." in seen and len(seen) > 8
    plain = CTReportDataset(tiny_demo / "ct_volumes.h5", {name: report}, [name], Tokenizer(77))
    assert plain.text(name) == report
    assert plain[0]["volume"].shape == (8, 28, 28)


def test_joined_sentence_ids_equal_tokenizing_the_joined_text():
    """``Tokenizer.join`` (each sentence encoded once) against open_clip on the joined text:
    CT-RATE-style reports with numbers, units, punctuation, HTML entities, non-ASCII and odd
    white space, every in-order subset, and truncation at a short context length."""
    import itertools

    from ctclip.data import split_sentences

    reports = [
        "Trachea and both main bronchi are open. A 12x8 mm nodule is seen in segment 6 of the "
        "right lower lobe. No pleural effusion!  Heart size is normal? Mediastinal structures "
        "were evaluated as suboptimal since the examination was unenhanced.",
        "Bilateral ground-glass opacities (peripheral, subpleural) &amp; septal thickening. "
        "Emphysematous changes, up to 3,5 cm, are observed.\tL1 vertebra: compression fracture.",
        "Findings: naïve scan —  degenerative changes in the thoracic spine. Aorta 41mm.",
    ]
    for context in (77, 16):
        tok = Tokenizer(context)
        for report in reports:
            sentences = split_sentences(report)
            for k in range(1, len(sentences) + 1):
                for subset in itertools.combinations(sentences, k):
                    expected = tok(" ".join(subset))[0]
                    torch.testing.assert_close(tok.join(list(subset)), expected)
