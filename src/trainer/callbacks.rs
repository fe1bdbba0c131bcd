//! Finetuner's callbacks, as decisions taken at each epoch end: which value a callback watches
//! ([`Monitor`]), whether the model improved ([`BestModel`], BestModelCheckpoint), when to stop
//! ([`EarlyStopper`], EarlyStopping), and WiSE-FT's weight averaging ([`wise_ft`]). The loop in
//! [`super::fit`] owns the weights and files; these types only keep the score, so the rules are
//! unit-tested without a model and survive a resume as plain numbers.

use serde::{Deserialize, Serialize};

use crate::eval::Metrics;

/// Which way is better for a monitored value; `auto` is min for losses and max for metrics
/// (Finetuner's rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Auto,
    Min,
    Max,
}

impl Mode {
    /// The names a user gives, with what each means.
    pub const CHOICES: [(&'static str, &'static str, Self); 3] = [
        (
            "auto",
            "min for losses, max for retrieval metrics",
            Self::Auto,
        ),
        ("min", "smaller is better", Self::Min),
        ("max", "larger is better", Self::Max),
    ];
}

/// A value watched at each epoch end: `train_loss`, `val_loss`, or one of the nine retrieval
/// metrics (Finetuner's prefixed keys such as `clip-text-to-clip-vision_precision_at_k` work too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Monitor {
    pub name: String,
    #[serde(default)]
    pub mode: Mode,
}

/// What an epoch produced, for monitors to read.
#[derive(Debug, Clone, Default)]
pub struct EpochValues {
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub metrics: Option<Metrics>,
}

impl Monitor {
    pub fn new(name: &str, mode: Mode) -> Result<Self, String> {
        let m = Self {
            name: name.to_string(),
            mode,
        };
        if !m.is_loss() && m.metric_index().is_none() {
            return Err(format!(
                "cannot monitor {name:?}: use train_loss, val_loss or one of {}",
                Metrics::NAMES.join(", ")
            ));
        }
        Ok(m)
    }

    fn is_loss(&self) -> bool {
        self.name == "train_loss" || self.name == "val_loss"
    }

    fn metric_index(&self) -> Option<usize> {
        Metrics::NAMES.iter().position(|n| {
            self.name == *n
                || self
                    .name
                    .strip_suffix(n)
                    .is_some_and(|p| p.ends_with('_') || p.ends_with('-'))
        })
    }

    /// Whether the run's data lets this monitor see a value every epoch.
    pub fn check_available(&self, has_eval_data: bool, has_metrics: bool) -> Result<(), String> {
        match self.name.as_str() {
            "train_loss" => Ok(()),
            "val_loss" if has_eval_data => Ok(()),
            "val_loss" => Err("monitoring val_loss needs --eval-data or --val-split".into()),
            _ if has_metrics => Ok(()),
            n => Err(format!(
                "monitoring {n} needs --query-data and --index-data with evaluation every epoch"
            )),
        }
    }

    /// True when smaller is better.
    pub fn minimises(&self) -> bool {
        match self.mode {
            Mode::Min => true,
            Mode::Max => false,
            Mode::Auto => self.is_loss(),
        }
    }

    pub fn value(&self, v: &EpochValues) -> Option<f64> {
        match self.name.as_str() {
            "train_loss" => Some(v.train_loss),
            "val_loss" => v.val_loss,
            _ => Some(v.metrics?.values()[self.metric_index()?]),
        }
    }
}

/// BestModelCheckpoint: the best value seen; the model is saved whenever it strictly improves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestModel {
    pub monitor: Monitor,
    pub best: Option<f64>,
    pub best_epoch: Option<usize>,
}

impl BestModel {
    pub fn new(monitor: Monitor) -> Self {
        Self {
            monitor,
            best: None,
            best_epoch: None,
        }
    }

    /// Records epoch `epoch`'s value; true when the model improved (and must be saved). The log
    /// line says what happened, in Finetuner's words.
    pub fn observe(&mut self, epoch: usize, v: &EpochValues) -> (bool, String) {
        let Some(cur) = self.monitor.value(v) else {
            return (false, format!("{} not available", self.monitor.name));
        };
        let better = match self.best {
            None => true,
            Some(b) if self.monitor.minimises() => cur < b,
            Some(b) => cur > b,
        };
        let name = &self.monitor.name;
        if better {
            let line = match self.best {
                None => format!("Model saved: first value {cur:.6} ({name})"),
                Some(b) => format!("Model improved from {b:.6} to {cur:.6} ({name})"),
            };
            self.best = Some(cur);
            self.best_epoch = Some(epoch);
            (true, line)
        } else {
            (false, format!("Model did not improve ({name} {cur:.6})"))
        }
    }
}

/// EarlyStopping: stops after `patience` epochs without an improvement of at least `min_delta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopper {
    pub monitor: Monitor,
    pub patience: usize,
    pub min_delta: f64,
    /// When set, every epoch is compared against this value instead of the best so far.
    pub baseline: Option<f64>,
    pub best: Option<f64>,
    pub wait: usize,
}

impl EarlyStopper {
    pub fn new(monitor: Monitor, patience: usize, min_delta: f64, baseline: Option<f64>) -> Self {
        Self {
            monitor,
            patience,
            min_delta: min_delta.abs(),
            baseline,
            best: None,
            wait: 0,
        }
    }

    /// Records an epoch; true when training must stop now.
    pub fn observe(&mut self, v: &EpochValues) -> bool {
        let Some(cur) = self.monitor.value(v) else {
            return false;
        };
        if let Some(b) = self.baseline {
            self.best = Some(b);
        }
        let improved = match self.best {
            None => true,
            Some(b) if self.monitor.minimises() => cur + self.min_delta < b,
            Some(b) => cur - self.min_delta > b,
        };
        if improved {
            self.best = Some(cur);
            self.wait = 0;
            false
        } else {
            self.wait += 1;
            self.wait >= self.patience
        }
    }
}

/// WiSE-FT: `alpha * finetuned + (1 - alpha) * pretrained`, element-wise.
pub fn wise_ft(
    finetuned: &candle_core::Tensor,
    pretrained: &candle_core::Tensor,
    alpha: f64,
) -> candle_core::Result<candle_core::Tensor> {
    (finetuned.affine(alpha, 0.0)? + pretrained.affine(1.0 - alpha, 0.0)?)?
        .to_dtype(finetuned.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(train: f64, val: Option<f64>) -> EpochValues {
        EpochValues {
            train_loss: train,
            val_loss: val,
            metrics: None,
        }
    }

    #[test]
    fn monitor_names_and_modes() {
        assert!(Monitor::new("val_loss", Mode::Auto).unwrap().minimises());
        let m = Monitor::new("clip-text-to-clip-vision_precision_at_k", Mode::Auto).unwrap();
        assert!(!m.minimises());
        let v = EpochValues {
            metrics: Some(Metrics {
                precision_at_k: 0.25,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(m.value(&v), Some(0.25));
        assert!(Monitor::new("accuracy", Mode::Auto).is_err());
        assert!(Monitor::new("at_k", Mode::Auto).is_err());
        let val = Monitor::new("val_loss", Mode::Auto).unwrap();
        assert!(val.check_available(false, true).is_err());
        assert!(m.check_available(true, false).is_err());
        assert!(m.check_available(false, true).is_ok());
    }

    #[test]
    fn best_model_saves_on_strict_improvement_only() {
        let mut b = BestModel::new(Monitor::new("val_loss", Mode::Auto).unwrap());
        assert!(b.observe(0, &loss(9.0, Some(2.0))).0);
        assert!(
            !b.observe(1, &loss(1.0, Some(2.0))).0,
            "equal is not better"
        );
        let (saved, line) = b.observe(2, &loss(1.0, Some(1.5)));
        assert!(saved);
        assert!(
            line.contains("improved from 2.000000 to 1.500000"),
            "{line}"
        );
        assert_eq!(b.best_epoch, Some(2));
        let mut m = BestModel::new(Monitor::new("train_loss", Mode::Max).unwrap());
        m.observe(0, &loss(1.0, None));
        assert!(m.observe(1, &loss(2.0, None)).0);
    }

    #[test]
    fn early_stopping_counts_epochs_without_min_delta_improvement() {
        let mut e = EarlyStopper::new(
            Monitor::new("train_loss", Mode::Auto).unwrap(),
            2,
            0.1,
            None,
        );
        assert!(!e.observe(&loss(1.0, None)));
        assert!(!e.observe(&loss(0.95, None)), "0.05 < min_delta: wait 1");
        assert!(!e.observe(&loss(0.5, None)), "improved: wait reset");
        assert!(!e.observe(&loss(0.45, None)));
        assert!(
            e.observe(&loss(0.44, None)),
            "second epoch without improvement"
        );
        // A baseline that is never beaten stops after `patience` epochs.
        let mut b = EarlyStopper::new(
            Monitor::new("train_loss", Mode::Auto).unwrap(),
            1,
            0.0,
            Some(0.1),
        );
        assert!(b.observe(&loss(0.5, None)));
    }

    #[test]
    fn wise_ft_interpolates() {
        let dev = candle_core::Device::Cpu;
        let a = candle_core::Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let b = candle_core::Tensor::new(&[3f32, 6.0], &dev).unwrap();
        let w = wise_ft(&a, &b, 0.25).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(w, vec![2.5, 5.0]);
        assert_eq!(
            wise_ft(&a, &b, 1.0).unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 2.0]
        );
    }
}
