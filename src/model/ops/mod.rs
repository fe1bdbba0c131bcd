//! Fused operations as candle custom ops. The GPU path's, for inference and training (CUDA
//! kernels there, their CPU twins elsewhere), each with a backward that is itself an op:
//! [`fused_attention`] (attention over the stacked QKV projection), [`clip_loss`] (the
//! training loss: row norms and the symmetric cross-entropy), [`fused_norm`] (layer
//! norm) and [`fused_tail`] (a linear layer's bias + activation or bias + residual), [`embed`] (each
//! tower's embedding: token + position rows, class token + positions), and
//! [`gpu_block`] (a whole block of those as one training node). The CPU
//! training graph's, with their own backward:
//! [`train_ops`] (linear, layer norm, quick_gelu, softmax, attention as single ops),
//! [`train_block`] (a whole transformer block as one op, the last one computing only the pooled
//! rows) and [`train_embed`] (each tower's embedding as one op). [`packed`]: a batch of
//! sequences laid end to end, as the attention ops and the block op take it. They run the kernels of
//! [`super::kernels`]; where they do not apply, the layers run candle's own ops.

/// Runs `$body` for the element type of the CUDA storage `$s`, with `$t` the Rust type and
/// `$suffix` the kernels' name suffix (`f32`, `f16`, `bf16`); other dtypes are an error naming
/// `$op`. Shared by the GPU path's ops (defined before their modules, which use it).
#[cfg(feature = "cuda")]
macro_rules! by_dtype {
    ($s:expr, $op:expr, |$t:ident, $suffix:ident| $body:expr) => {{
        use candle_core::backend::BackendStorage;
        match $s.dtype() {
            candle_core::DType::F32 => {
                type $t = f32;
                let $suffix = "f32";
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                let $suffix = "f16";
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                let $suffix = "bf16";
                $body
            }
            dt => candle_core::bail!("{}: f32, f16 or bf16 only, not {dt:?}", $op),
        }
    }};
}

pub mod clip_loss;
pub mod embed;
pub mod fused_attention;
pub mod fused_norm;
pub mod fused_tail;
pub mod gpu_block;
pub mod packed;
pub mod train_block;
pub mod train_embed;
pub mod train_ops;

/// The values of a contiguous CPU input of a GPU inference op, as f32 (converted from f16 and
/// bf16): what the kernels' CPU twins compute on. `op` names the op in errors.
pub(crate) fn twin_input(
    s: &candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<Vec<f32>> {
    use candle_core::CpuStorage;
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: contiguous inputs only")))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        _ => candle_core::bail!("{op}: f32, f16 or bf16 only"),
    })
}

/// A CPU tensor an op holds besides its inputs (a weight, a residual gradient), as
/// [`twin_input`] reads an input: its values as f32. `op` names the op in errors.
pub(crate) fn twin_tensor(t: &candle_core::Tensor, op: &str) -> candle_core::Result<Vec<f32>> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("{op}: a tensor the op holds is not on the CPU")
    };
    twin_input(s, l, op)
}

/// A twin's f32 output in the storage type of the op's first input (rounded once).
pub(crate) fn twin_output(
    like: &candle_core::CpuStorage,
    out: Vec<f32>,
) -> candle_core::CpuStorage {
    use candle_core::CpuStorage;
    match like {
        CpuStorage::F16(_) => CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
        CpuStorage::BF16(_) => {
            CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect())
        }
        _ => CpuStorage::F32(out),
    }
}

/// Rounding to the element type of `like` (to nearest even) and back: what storing a twin's
/// f32 value in a tensor of that type does.
pub(crate) fn twin_rounding(like: &candle_core::CpuStorage) -> fn(f32) -> f32 {
    use candle_core::CpuStorage;
    match like {
        CpuStorage::F16(_) => |x| half::f16::from_f32(x).to_f32(),
        CpuStorage::BF16(_) => |x| half::bf16::from_f32(x).to_f32(),
        _ => |x| x,
    }
}

/// A contiguous CUDA input of an op, viewed from its layout's offset for its own length.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a candle_core::CudaStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let v = s.as_cuda_slice::<T>()?.slice(l.start_offset()..);
    Ok(v.slice(..l.shape().elem_count()))
}

/// A bias's gradient: the column sums of `g` over every row, accumulated in f32 whatever `g`
/// holds, returned in `g`'s dtype. On the GPU path one [`fused_tail::ColumnSum`] over `g` as
/// it is (no f32 copy of the gradient); candle's ops where that does not take `g`.
pub(crate) fn bias_grad(g: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    use crate::model::kernels::cuda::elementwise::column_sum_supports;
    let cols = g.dims().last().copied().unwrap_or(0);
    let rows = g.elem_count() / cols.max(1);
    let g2 = g.reshape((rows, cols))?;
    let ours = matches!(
        g.dtype(),
        candle_core::DType::F32 | candle_core::DType::F16 | candle_core::DType::BF16
    ) && cols > 0
        && column_sum_supports(rows);
    if ours {
        return g2.contiguous()?.apply_op1_no_bwd(&fused_tail::ColumnSum);
    }
    g2.to_dtype(candle_core::DType::F32)?
        .sum(0)?
        .to_dtype(g.dtype())
}
