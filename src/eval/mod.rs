//! Retrieval evaluation: the nine docarray metrics ([`metrics`]) and the text-to-image evaluator
//! ([`evaluator`]) that the `eval` command and the trainer's callbacks use.

pub mod evaluator;
pub mod metrics;

pub use evaluator::{evaluate, EvalError, Evaluation, LabeledEmbeddings};
pub use metrics::Metrics;
