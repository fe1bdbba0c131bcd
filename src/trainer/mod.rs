//! Fine-tuning: CLIPLoss ([`loss`]), Adam/AdamW updating in place ([`optim`]), learning-rate
//! schedules ([`schedule`]) and the training step on the one model definition ([`train`]).

pub mod fit;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod train;
