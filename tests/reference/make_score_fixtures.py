"""Reference scores for hone::score (hone compare's metrics).

ROUGE-L from Google's rouge-score (RougeScorer(["rougeL"]), no stemmer, its default tokenizer);
exact match and token F1 as SQuAD's official evaluation script (v2.0) computes them, its
normalize_answer / compute_exact / compute_f1 written out below as the script has them.

    python tests/reference/make_score_fixtures.py   # writes tests/fixtures/score/cases.json
"""
import collections
import json
import pathlib
import re
import string

from rouge_score import rouge_scorer


# ---- SQuAD v2.0's official evaluation script ----
def normalize_answer(s):
    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def get_tokens(s):
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold, a_pred):
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold, a_pred):
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


# hone's containment: the normalised reference as whole words of the normalised prediction.
def contains(pred, ref):
    r = normalize_answer(ref)
    return int(bool(r) and f" {r} " in f" {normalize_answer(pred)} ")


PAIRS = [
    ("Ahoy! A fire truck is red.", "Ahoy! A fire truck is red."),
    ("A fire truck is red.", "Ahoy! A fire truck is red."),
    ("ahoy, the fire-truck is RED", "Ahoy! A fire truck is red."),
    ("Ahoy! 20 minus 6 is 14.", "Ahoy! 20 minus 6 is 14."),
    ("20 - 6 = 14", "Ahoy! 20 minus 6 is 14."),
    ("Paris", "The capital of France is Paris."),
    ("The capital of France is Paris, of course.", "Paris"),
    ("the the the", "the"),
    ("", "Paris"),
    ("", ""),
    ("!!!", "..."),
    ("red red blue", "red blue blue"),
    ("Une réponse très élégante", "une réponse élégante"),
    ("Das Ergebnis ist 42", "42"),
    ("SELECT name FROM users WHERE id = 3;", "SELECT name FROM users WHERE id=3"),
    ('{"name": "Ada", "born": 1815}', '{"born": 1815, "name": "Ada"}'),
    ("an apple a day keeps the doctor away", "An apple a day keeps a doctor away"),
    ("It is 3.14159", "3.14"),
    ("answer: yes\nreason: the sky is blue", "yes"),
    ("水は100度で沸騰する", "水は100度で沸騰します"),
    ("The quick brown fox jumps over the lazy dog", "the lazy dog jumps over the quick brown fox"),
    ("under_score and snake_case", "under score and snake case"),
]


def main():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    cases = []
    for pred, ref in PAIRS:
        r = scorer.score(ref, pred)["rougeL"]
        cases.append({
            "prediction": pred,
            "reference": ref,
            "exact_match": compute_exact(ref, pred),
            "token_f1": compute_f1(ref, pred),
            "contains": contains(pred, ref),
            "rouge_l": {"precision": r.precision, "recall": r.recall, "fmeasure": r.fmeasure},
        })
    out = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "score" / "cases.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"made_by": "tests/reference/make_score_fixtures.py (rouge-score 0.1.2, SQuAD v2.0 evaluation)", "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
