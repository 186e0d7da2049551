"""Corpus-level BLEU and chrF with sacrebleu, tokenized for the target language."""

from __future__ import annotations


def score(hypotheses: list[str], references: list[str], target_lang: str) -> dict:
    """{"bleu", "chrf", "n"}; Chinese targets use sacrebleu's `zh` tokenizer (it segments characters)."""
    import sacrebleu
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        return {"bleu": 0.0, "chrf": 0.0, "n": 0}
    tokenize = "zh" if target_lang == "zh" else "13a"
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    return {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2), "n": len(references)}
