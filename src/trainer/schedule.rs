//! Learning-rate schedules with linear warm-up, as transformers' `get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (half a cosine) compute
//! them; `step` counts optimiser steps from 0, as `LambdaLR` does.

/// Shape of the learning rate over training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Constant,
    Linear,
    Cosine,
}

impl Scheduler {
    /// The names a user gives, with what each does after the warm-up.
    pub const CHOICES: [(&'static str, &'static str, Self); 3] = [
        ("constant", "the learning rate stays", Self::Constant),
        (
            "linear",
            "falls linearly to 0 at the last step",
            Self::Linear,
        ),
        ("cosine", "falls along a half cosine to 0", Self::Cosine),
    ];
}

/// The learning rate for optimiser step `step` (0-based) of `total`.
pub fn learning_rate(base: f64, s: Scheduler, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let after = (step - warmup) as f64;
    let span = total.saturating_sub(warmup).max(1) as f64;
    match s {
        Scheduler::Constant => base,
        Scheduler::Linear => base * ((total as f64 - step as f64) / span).max(0.0),
        Scheduler::Cosine => {
            base * (0.5 * (1.0 + (std::f64::consts::PI * after / span).cos())).max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(learning_rate(1.0, Scheduler::Constant, 0, 0, 10), 1.0);
        assert_eq!(learning_rate(1.0, Scheduler::Constant, 0, 4, 10), 0.0);
        assert_eq!(learning_rate(1.0, Scheduler::Linear, 2, 4, 10), 0.5);
        assert_eq!(learning_rate(1.0, Scheduler::Linear, 4, 4, 10), 1.0);
        assert!((learning_rate(1.0, Scheduler::Linear, 7, 4, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(1.0, Scheduler::Linear, 10, 4, 10), 0.0);
        assert!((learning_rate(1.0, Scheduler::Cosine, 7, 4, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(1.0, Scheduler::Cosine, 4, 4, 10), 1.0);
    }
}
