//! Learning-rate schedules as transformers defines them (`get_*_schedule_with_warmup`): the
//! rate for optimizer step `k` (0-based) is `lr * factor(k)`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "constant" => Schedule::Constant,
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    pub fn factor(&self, step: usize) -> f64 {
        let (k, w, n) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return k / w.max(1.0);
        }
        match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((n - k) / (n - w).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (k - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        self.lr * self.factor(step)
    }
}
