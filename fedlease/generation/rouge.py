"""ROUGE-1/2/L F-measures with Google's ``rouge-score`` package (Porter stemming on), averaged
over examples, as fractions in [0, 1]."""

from __future__ import annotations

KINDS = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F-measure of each ROUGE kind over the (prediction, reference) pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(KINDS), use_stemmer=True)
    totals = dict.fromkeys(KINDS, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in KINDS:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}
