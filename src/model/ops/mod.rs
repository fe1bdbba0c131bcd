//! Fused operations as candle custom ops. For inference on a GPU (CUDA kernels there, their
//! CPU twins elsewhere): [`fused_attention`] (attention as one op) and [`fused_tail`] (a linear
//! layer's bias + activation or bias + residual as one op). The training graph's, with their own
//! backward:
//! [`train_ops`] (linear, layer norm, quick_gelu, softmax, attention as single ops),
//! [`train_block`] (a whole transformer block as one op, the last one computing only the pooled
//! rows) and [`train_embed`] (each tower's embedding as one op). They run the kernels of
//! [`super::kernels`]; where they do not apply, the layers run candle's own ops.

pub mod fused_attention;
pub mod fused_tail;
pub mod train_block;
pub mod train_embed;
pub mod train_ops;
