//! The comparison's report: the same numbers as JSON, Markdown and one self-contained HTML file
//! (inline CSS and SVG, no script, no request), and the blind review sheet.

use crate::score::Scores;
use crate::train::trainer::EvalReport;
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Serialize)]
pub struct Variant {
    pub name: String,
    pub adapter: Option<String>,
    /// Loss and perplexity on the held-out completions.
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    /// Perplexity on the general text (forgetting: compare with the base's).
    pub general_perplexity: f64,
    /// Means over the replies, 0 to 1.
    pub exact_match: f64,
    pub contains: f64,
    pub token_f1: f64,
    pub rouge_l: f64,
    /// One mean per check, in the report's order.
    pub checks: Vec<f64>,
    /// Generation speed (prompt processing included).
    pub tokens_per_s: f64,
    /// Each reply's scores, in the rows' order.
    pub scores: Vec<Scores>,
}

impl Variant {
    pub fn new(name: &str, adapter: Option<String>, held_out: &EvalReport, general: &EvalReport, scores: &[Scores], tokens_per_s: f64) -> Variant {
        let n = scores.len().max(1) as f64;
        let mean = |f: &dyn Fn(&Scores) -> f64| scores.iter().map(f).sum::<f64>() / n;
        let checks = (0..scores.first().map_or(0, |s| s.checks.len())).map(|i| mean(&|s| s.checks[i])).collect();
        Variant {
            name: name.into(),
            adapter,
            loss: held_out.loss,
            perplexity: held_out.perplexity,
            tokens: held_out.tokens,
            general_perplexity: general.perplexity,
            exact_match: mean(&|s| s.exact_match),
            contains: mean(&|s| s.contains),
            token_f1: mean(&|s| s.token_f1),
            rouge_l: mean(&|s| s.rouge_l),
            checks,
            tokens_per_s,
            scores: scores.to_vec(),
        }
    }
}

#[derive(Serialize)]
pub struct Row {
    pub prompt: String,
    pub reference: String,
    /// One reply per variant, in the variants' order.
    pub replies: Vec<String>,
}

#[derive(Serialize)]
pub struct Report {
    pub model: String,
    pub data: String,
    pub general: String,
    pub checks: Vec<String>,
    pub decoding: String,
    pub max_new_tokens: usize,
    pub variants: Vec<Variant>,
    pub rows: Vec<Row>,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', "<br>")
}

impl Report {
    /// (name, value per variant) of every 0-to-1 metric, the checks last.
    fn metrics(&self) -> Vec<(String, Vec<f64>)> {
        let mut out: Vec<(String, Vec<f64>)> = vec![
            ("exact match".into(), self.variants.iter().map(|v| v.exact_match).collect()),
            ("contains".into(), self.variants.iter().map(|v| v.contains).collect()),
            ("token F1".into(), self.variants.iter().map(|v| v.token_f1).collect()),
            ("ROUGE-L".into(), self.variants.iter().map(|v| v.rouge_l).collect()),
        ];
        for (i, c) in self.checks.iter().enumerate() {
            out.push((format!("check {c}"), self.variants.iter().map(|v| v.checks[i]).collect()));
        }
        out
    }

    /// The general text's perplexity against the base's, as a signed change.
    fn forgetting(&self, v: &Variant) -> String {
        let base = self.variants[0].general_perplexity;
        format!("{:+.1}%", 100.0 * (v.general_perplexity / base - 1.0))
    }

    /// The numbers as a Markdown table (what `hone compare` prints).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let head: Vec<String> = self.variants.iter().map(|v| md_cell(&v.name)).collect();
        let _ = writeln!(s, "| | {} |", head.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(self.variants.len()));
        let row = |s: &mut String, name: &str, cells: Vec<String>| {
            let _ = writeln!(s, "| {name} | {} |", cells.join(" | "));
        };
        row(&mut s, "held-out loss", self.variants.iter().map(|v| format!("{:.4}", v.loss)).collect());
        row(&mut s, "held-out perplexity", self.variants.iter().map(|v| format!("{:.3}", v.perplexity)).collect());
        for (name, values) in self.metrics() {
            row(&mut s, &md_cell(&name), values.iter().map(|&x| pct(x)).collect());
        }
        row(&mut s, "general-text perplexity", self.variants.iter().map(|v| format!("{:.3}", v.general_perplexity)).collect());
        row(&mut s, "forgetting (general perplexity vs base)", self.variants.iter().map(|v| self.forgetting(v)).collect());
        row(&mut s, "generation tokens/s", self.variants.iter().map(|v| format!("{:.1}", v.tokens_per_s)).collect());
        s
    }

    fn markdown(&self) -> String {
        let mut s = format!(
            "# hone compare\n\nModel `{}`, held-out data `{}` ({} replies, {}, at most {} new tokens), general text: {}.\n\n",
            self.model,
            self.data,
            self.rows.len(),
            self.decoding,
            self.max_new_tokens,
            self.general
        );
        s.push_str(&self.summary());
        s.push_str("\n## Samples\n\n");
        let head: Vec<String> = self.variants.iter().map(|v| md_cell(&v.name)).collect();
        let _ = writeln!(s, "| prompt | reference | {} |", head.join(" | "));
        let _ = writeln!(s, "|---|---|{}", "---|".repeat(self.variants.len()));
        for r in &self.rows {
            let replies: Vec<String> = r.replies.iter().map(|x| md_cell(x)).collect();
            let _ = writeln!(s, "| {} | {} | {} |", md_cell(&r.prompt), md_cell(&r.reference), replies.join(" | "));
        }
        s
    }

    fn chart(&self) -> String {
        let metrics = self.metrics();
        let (bar, gap, group_gap, height) = (18.0, 2.0, 24.0, 160.0);
        let group = self.variants.len() as f64 * (bar + gap) + group_gap;
        let width = 120.0 + metrics.len() as f64 * group;
        let mut svg = format!("<svg viewBox=\"0 0 {width} {}\" role=\"img\" aria-label=\"Metrics by model\" class=\"chart\">", height + 60.0);
        for (m, (name, values)) in metrics.iter().enumerate() {
            let x0 = 30.0 + m as f64 * group;
            for (i, v) in values.iter().enumerate() {
                let h = (v.clamp(0.0, 1.0) * height).max(0.5);
                let x = x0 + i as f64 * (bar + gap);
                let _ = write!(svg, "<rect class=\"c{}\" x=\"{x}\" y=\"{}\" width=\"{bar}\" height=\"{h}\"><title>{}: {}</title></rect>", i % 6, 10.0 + height - h, esc(&self.variants[i].name), pct(*v));
            }
            let _ = write!(svg, "<text x=\"{}\" y=\"{}\" class=\"label\">{}</text>", x0, height + 28.0, esc(name));
        }
        let _ = write!(svg, "<line x1=\"28\" y1=\"{}\" x2=\"{width}\" y2=\"{}\" class=\"axis\"/></svg>", 10.0 + height, 10.0 + height);
        let legend: Vec<String> = self.variants.iter().enumerate().map(|(i, v)| format!("<span class=\"key c{}\"></span>{}", i % 6, esc(&v.name))).collect();
        format!("{svg}<p class=\"legend\">{}</p>", legend.join(" "))
    }

    fn html(&self) -> String {
        let mut s = String::new();
        s.push_str(&page_head("hone compare"));
        let _ = write!(
            s,
            "<h1>hone compare</h1><p>Model <code>{}</code> · held-out data <code>{}</code> · {} replies, {}, at most {} new tokens · general text: {}</p>",
            esc(&self.model),
            esc(&self.data),
            self.rows.len(),
            esc(&self.decoding),
            self.max_new_tokens,
            esc(&self.general)
        );
        s.push_str("<table><thead><tr><th></th>");
        for v in &self.variants {
            let _ = write!(s, "<th>{}</th>", esc(&v.name));
        }
        s.push_str("</tr></thead><tbody>");
        let row = |s: &mut String, name: &str, cells: Vec<String>| {
            let _ = write!(s, "<tr><th>{}</th>{}</tr>", esc(name), cells.iter().map(|c| format!("<td>{}</td>", esc(c))).collect::<String>());
        };
        row(&mut s, "held-out loss", self.variants.iter().map(|v| format!("{:.4}", v.loss)).collect());
        row(&mut s, "held-out perplexity", self.variants.iter().map(|v| format!("{:.3}", v.perplexity)).collect());
        for (name, values) in self.metrics() {
            row(&mut s, &name, values.iter().map(|&x| pct(x)).collect());
        }
        row(&mut s, "general-text perplexity", self.variants.iter().map(|v| format!("{:.3}", v.general_perplexity)).collect());
        row(&mut s, "forgetting (vs base)", self.variants.iter().map(|v| self.forgetting(v)).collect());
        row(&mut s, "generation tokens/s", self.variants.iter().map(|v| format!("{:.1}", v.tokens_per_s)).collect());
        s.push_str("</tbody></table>");
        s.push_str(&self.chart());
        s.push_str("<h2>Samples</h2><table class=\"samples\"><thead><tr><th>prompt</th><th>reference</th>");
        for v in &self.variants {
            let _ = write!(s, "<th>{}</th>", esc(&v.name));
        }
        s.push_str("</tr></thead><tbody>");
        for (i, r) in self.rows.iter().enumerate() {
            let _ = write!(s, "<tr><td>{}</td><td>{}</td>", esc(&r.prompt), esc(&r.reference));
            for (v, reply) in self.variants.iter().zip(&r.replies) {
                let sc = &v.scores[i];
                let _ = write!(s, "<td>{}<div class=\"scores\">F1 {:.2} · ROUGE-L {:.2}{}</div></td>", esc(reply), sc.token_f1, sc.rouge_l, if sc.exact_match > 0.0 { " · exact" } else { "" });
            }
            s.push_str("</tr>");
        }
        s.push_str("</tbody></table></body></html>\n");
        s
    }

    /// The blind sheet (replies shuffled per row under letters) and its key.
    fn blind(&self, seed: u64) -> (String, serde_json::Value) {
        let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            // splitmix64: a seeded shuffle needs nothing more.
            rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let letters: Vec<String> = (0..self.variants.len()).map(|i| ((b'A' + i as u8) as char).to_string()).collect();
        let mut s = page_head("hone compare: blind review");
        let _ = write!(s, "<h1>Blind review</h1><p>{} prompts; for each, the replies of {} models in a shuffled order. The key is in review-key.json.</p><table class=\"samples\"><thead><tr><th>#</th><th>prompt</th><th>reference</th>", self.rows.len(), self.variants.len());
        for l in &letters {
            let _ = write!(s, "<th>{l}</th>");
        }
        s.push_str("</tr></thead><tbody>");
        let mut key = Vec::new();
        for (i, r) in self.rows.iter().enumerate() {
            let mut order: Vec<usize> = (0..r.replies.len()).collect();
            for j in (1..order.len()).rev() {
                order.swap(j, (next() % (j as u64 + 1)) as usize);
            }
            let _ = write!(s, "<tr><td>{}</td><td>{}</td><td>{}</td>", i + 1, esc(&r.prompt), esc(&r.reference));
            for &o in &order {
                let _ = write!(s, "<td>{}</td>", esc(&r.replies[o]));
            }
            s.push_str("</tr>");
            let map: serde_json::Map<String, serde_json::Value> = letters.iter().zip(&order).map(|(l, &o)| (l.clone(), self.variants[o].name.clone().into())).collect();
            key.push(serde_json::json!({ "row": i + 1, "columns": map }));
        }
        s.push_str("</tbody></table></body></html>\n");
        (s, serde_json::Value::Array(key))
    }

    /// The report's files by name: report.json, report.md, report.html and, with a seed, the
    /// blind sheet review.html and its key review-key.json.
    pub fn files(&self, blind_seed: Option<u64>) -> Vec<(&'static str, Vec<u8>)> {
        // serde_json writes non-finite numbers as null: serializing these cannot fail.
        let mut out = vec![("report.json", serde_json::to_vec_pretty(self).expect("serializable")), ("report.md", self.markdown().into_bytes()), ("report.html", self.html().into_bytes())];
        if let Some(seed) = blind_seed {
            let (html, key) = self.blind(seed);
            out.push(("review.html", html.into_bytes()));
            out.push(("review-key.json", serde_json::to_vec_pretty(&key).expect("serializable")));
        }
        out
    }
}

fn page_head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\"><title>{}</title><style>{CSS}</style></head><body>",
        esc(title)
    )
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:12px 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}\
.samples td{max-width:28em;white-space:pre-wrap}.scores{color:#666;font-size:12px;margin-top:4px}.chart{max-width:560px;width:100%;display:block}.label{font-size:10px}.axis{stroke:#888}\
.c0{fill:#4e79a7;background:#4e79a7}.c1{fill:#f28e2b;background:#f28e2b}.c2{fill:#59a14f;background:#59a14f}.c3{fill:#e15759;background:#e15759}.c4{fill:#76b7b2;background:#76b7b2}.c5{fill:#edc948;background:#edc948}\
.key{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}";
