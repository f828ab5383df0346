//! Scores of a generated reply against a reference, as the tools people compare with compute
//! them: SQuAD's answer normalisation, exact match and token F1 (the official evaluation
//! script, v2's handling of empty answers); ROUGE-L as Google's `rouge-score` computes it
//! (its default tokenizer, no stemming); containment; and checks for extraction tasks (the
//! reply parses as JSON, or matches a regular expression). Checked against those references in
//! tests/reference/make_score_fixtures.py.

use std::collections::HashMap;

/// SQuAD's `normalize_answer`: lower case, ASCII punctuation removed, the articles a/an/the
/// removed, whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // Python's `\b(a|an|the)\b` with re.UNICODE: whole words, split at non-word characters.
    let mut out = String::with_capacity(no_punc.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if !matches!(word.as_str(), "a" | "an" | "the") {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punc.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    // Python's str.split(): any Unicode whitespace.
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// SQuAD's exact match: the normalised strings are equal.
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    normalize_answer(prediction) == normalize_answer(reference)
}

/// SQuAD's token F1 over normalised words (1 when both are empty, 0 when only one is).
pub fn token_f1(prediction: &str, reference: &str) -> f64 {
    let p = normalize_answer(prediction);
    let r = normalize_answer(reference);
    let (p, r): (Vec<&str>, Vec<&str>) = (p.split_whitespace().collect(), r.split_whitespace().collect());
    if p.is_empty() || r.is_empty() {
        return (p == r) as u8 as f64;
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &r {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0usize;
    for w in &p {
        if let Some(n) = counts.get_mut(w) {
            if *n > 0 {
                *n -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The reference, normalised, appears in the normalised prediction as whole words.
pub fn contains(prediction: &str, reference: &str) -> bool {
    let r = normalize_answer(reference);
    !r.is_empty() && format!(" {} ", normalize_answer(prediction)).contains(&format!(" {r} "))
}

/// rouge-score's default tokenizer: lower case, every run of characters outside [a-z0-9] a
/// separator (so non-ASCII letters separate too), no stemming.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit())).filter(|t| !t.is_empty()).map(str::to_string).collect()
}

/// ROUGE-L of a prediction against a target: precision, recall and F-measure of their longest
/// common token subsequence (rouge-score's `RougeScorer(["rougeL"])`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Rouge {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

pub fn rouge_l(prediction: &str, target: &str) -> Rouge {
    let (p, t) = (rouge_tokens(prediction), rouge_tokens(target));
    if p.is_empty() || t.is_empty() {
        return Rouge { precision: 0.0, recall: 0.0, fmeasure: 0.0 };
    }
    let lcs = lcs_len(&t, &p) as f64;
    let precision = lcs / p.len() as f64;
    let recall = lcs / t.len() as f64;
    let fmeasure = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
    Rouge { precision, recall, fmeasure }
}

fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            row[j + 1] = if x == y { prev[j] + 1 } else { row[j].max(prev[j + 1]) };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
}

/// A pass/fail check of a reply on its own, for extraction and structured-output tasks.
#[derive(Debug, Clone)]
pub enum Check {
    /// The reply (inside a ```json fence, if it has one) parses as JSON.
    Json,
    /// The reply matches the expression somewhere (anchor it with ^…$ for the whole reply).
    Regex(regex::Regex),
}

impl Check {
    /// `json` or `regex:PATTERN`.
    pub fn parse(spec: &str) -> crate::Result<Check> {
        if spec == "json" {
            return Ok(Check::Json);
        }
        match spec.strip_prefix("regex:") {
            Some(p) => regex::Regex::new(p).map(Check::Regex).map_err(|e| crate::Error::format("--check", format!("{spec}: {e}"))),
            None => Err(crate::Error::format("--check", format!("{spec}: expected json or regex:PATTERN"))),
        }
    }

    /// The name the report shows.
    pub fn name(&self) -> String {
        match self {
            Check::Json => "json".into(),
            Check::Regex(r) => format!("regex:{}", r.as_str()),
        }
    }

    pub fn passes(&self, reply: &str) -> bool {
        match self {
            Check::Json => {
                let t = reply.trim();
                let inner = t.strip_prefix("```json").or_else(|| t.strip_prefix("```")).and_then(|s| s.trim_end().strip_suffix("```")).unwrap_or(t);
                serde_json::from_str::<serde_json::Value>(inner.trim()).is_ok()
            }
            Check::Regex(r) => r.is_match(reply),
        }
    }
}

/// Every score of one reply.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scores {
    pub exact_match: f64,
    pub contains: f64,
    pub token_f1: f64,
    pub rouge_l: f64,
    /// One per check, in the order given: 1 passed, 0 failed.
    pub checks: Vec<f64>,
}

pub fn score(reply: &str, reference: &str, checks: &[Check]) -> Scores {
    Scores {
        exact_match: exact_match(reply, reference) as u8 as f64,
        contains: contains(reply, reference) as u8 as f64,
        token_f1: token_f1(reply, reference),
        rouge_l: rouge_l(reply, reference).fmeasure,
        checks: checks.iter().map(|c| c.passes(reply) as u8 as f64).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_normalisation() {
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(normalize_answer("An apple, a day"), "apple day");
        assert!(exact_match("the answer is: Paris.", "Answer is paris"));
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("x", ""), 0.0);
    }

    #[test]
    fn checks() {
        assert!(Check::parse("json").unwrap().passes("```json\n{\"a\": 1}\n```"));
        assert!(!Check::parse("json").unwrap().passes("{a: 1}"));
        assert!(Check::parse("regex:^Ahoy").unwrap().passes("Ahoy! Red."));
        assert!(Check::parse("regex:(").is_err() && Check::parse("yaml").is_err());
    }
}
