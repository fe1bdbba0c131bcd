//! Fine-tuning: CLIPLoss ([`loss`]), Adam/AdamW updating in place ([`optim`]), learning-rate
//! schedules ([`schedule`]) and the training step on the one model definition ([`train`]).

pub mod callbacks;
pub mod checkpoint;
pub mod client;
pub mod datasets;
pub mod fit;
pub mod loss;
pub mod optim;
pub mod runs;
pub mod schedule;
pub mod service;
pub mod train;
