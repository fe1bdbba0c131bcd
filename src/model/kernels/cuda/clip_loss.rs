//! The CPU twins and launchers of `clip_loss.cu` (see its header): the rows' L2 normalisation
//! and the symmetric cross-entropy of CLIPLoss, forward and backward. Each twin follows its
//! kernel's summation order (lane-strided partial sums, the warp's butterfly, one block's tree),
//! so the two agree to rounding.

use candle_core::{bail, Result};

/// `v` summed as a warp of 32 lanes sums it: lane `l` takes elements `l, l + 32, ...`, then the
/// butterfly (`v[l] + v[l ^ o]` for o = 16, 8, 4, 2, 1).
fn warp_sum(v: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0f32; 32];
    for (j, x) in v.enumerate() {
        lanes[j % 32] += x;
    }
    let mut o = 16;
    while o > 0 {
        let before = lanes;
        for (l, x) in lanes.iter_mut().enumerate() {
            *x = before[l] + before[l ^ o];
        }
        o /= 2;
    }
    lanes[0]
}

/// Rows of `cols` in `len` values; errors on a ragged or oversized shape.
fn rows_of(len: usize, cols: usize) -> Result<usize> {
    if cols == 0 || !len.is_multiple_of(cols) || i32::try_from(len / cols).is_err() {
        bail!("row norm: {len} values are not whole rows of {cols}");
    }
    if i32::try_from(cols).is_err() {
        bail!("row norm: rows of {cols} are too wide");
    }
    Ok(len / cols)
}

/// `x / |x|` per row of `cols`, as `clipft_row_norm_*`.
pub fn row_norm_twin(x: &[f32], cols: usize) -> Result<Vec<f32>> {
    rows_of(x.len(), cols)?;
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks(cols).zip(y.chunks_mut(cols)) {
        let inv = 1.0 / warp_sum(xr.iter().map(|v| v * v)).sqrt();
        for (y, x) in yr.iter_mut().zip(xr) {
            *y = x * inv;
        }
    }
    Ok(y)
}

/// The gradient of `x` from the gradient `dy` of [`row_norm_twin`]'s output, as
/// `clipft_row_norm_backward_*`: `(dy - y (y . dy)) / |x|`.
pub fn row_norm_backward_twin(x: &[f32], dy: &[f32], cols: usize) -> Result<Vec<f32>> {
    rows_of(x.len(), cols)?;
    if dy.len() != x.len() {
        bail!(
            "row norm backward: {} values and a gradient of {}",
            x.len(),
            dy.len()
        );
    }
    let mut dx = vec![0f32; x.len()];
    for ((xr, gr), dr) in x.chunks(cols).zip(dy.chunks(cols)).zip(dx.chunks_mut(cols)) {
        let inv = 1.0 / warp_sum(xr.iter().map(|v| v * v)).sqrt();
        let ydy = warp_sum(xr.iter().zip(gr).map(|(v, g)| v * g)) * inv;
        for ((d, x), g) in dr.iter_mut().zip(xr).zip(gr) {
            *d = (g - x * inv * ydy) * inv;
        }
    }
    Ok(dx)
}

/// Checks a `b x b` similarity matrix.
fn check_square(len: usize) -> Result<usize> {
    let b = (len as f64).sqrt().round() as usize;
    if b == 0 || b * b != len || i32::try_from(2 * b).is_err() {
        bail!("CLIPLoss: {len} similarities are not a square batch");
    }
    Ok(b)
}

/// Per row `k < b` and column `b + k` of `L = exp(log_scale) x`: the log-sum-exp and the term
/// `lse - L_kk`, as `clipft_clip_ce_lse`.
pub fn clip_ce_lse_twin(x: &[f32], log_scale: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    let b = check_square(x.len())?;
    let s = log_scale.exp();
    let (mut lse, mut terms) = (vec![0f32; 2 * b], vec![0f32; 2 * b]);
    for w in 0..2 * b {
        let (col, k) = (w >= b, w % b);
        let at = |j: usize| s * if col { x[j * b + k] } else { x[k * b + j] };
        let m = (0..b).map(at).fold(f32::NEG_INFINITY, f32::max);
        let l = m + warp_sum((0..b).map(|j| (at(j) - m).exp())).ln();
        lse[w] = l;
        terms[w] = l - s * x[k * b + k];
    }
    Ok((lse, terms))
}

/// `factor * sum(v)` as `clipft_clip_ce_sum` sums it: 256 thread-strided sums, then a tree.
pub fn clip_ce_sum_twin(v: &[f32], factor: f32) -> f32 {
    let mut part = [0f32; 256];
    for (i, x) in v.iter().enumerate() {
        part[i % 256] += x;
    }
    let mut h = 128;
    while h > 0 {
        for t in 0..h {
            part[t] += part[t + h];
        }
        h /= 2;
    }
    part[0] * factor
}

/// The loss of the `b x b` similarities `x` at `log_scale`: [`clip_ce_lse_twin`], then the
/// terms' sum over `2 b`.
pub fn clip_ce_twin(x: &[f32], log_scale: f32) -> Result<f32> {
    let (_, terms) = clip_ce_lse_twin(x, log_scale)?;
    Ok(clip_ce_sum_twin(&terms, 1.0 / terms.len() as f32))
}

/// The gradients for an upstream gradient `g` of the loss, as `clipft_clip_ce_backward` then
/// `clipft_clip_ce_sum`: `b * b + 1` values, `dx` row-major, then `d log_scale`.
pub fn clip_ce_backward_twin(x: &[f32], log_scale: f32, g: f32) -> Result<Vec<f32>> {
    let b = check_square(x.len())?;
    let (lse, _) = clip_ce_lse_twin(x, log_scale)?;
    let s = log_scale.exp();
    let scale = g / (2.0 * b as f32);
    let mut out = vec![0f32; b * b + 1];
    let mut partial = vec![0f32; b];
    for k in 0..b {
        let mut lanes = Vec::with_capacity(b);
        for j in 0..b {
            let l = s * x[k * b + j];
            let diag = if j == k { 2.0 } else { 0.0 };
            let d = scale * ((l - lse[k]).exp() + (l - lse[b + j]).exp() - diag);
            out[k * b + j] = s * d;
            lanes.push(d * l);
        }
        partial[k] = warp_sum(lanes.into_iter());
    }
    out[b * b] = clip_ce_sum_twin(&partial, 1.0);
    Ok(out)
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/clip_loss.ptx"));
    const WARPS: u32 = 4;

    fn warps(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((n as u32).div_ceil(WARPS).max(1), 1, 1),
            block_dim: (WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `clipft_row_norm_<suffix>`: `x / |x|` per row of `cols`, in f32.
    pub fn row_norm<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        cols: usize,
    ) -> Result<CudaSlice<f32>> {
        let rows = super::rows_of(x.len(), cols)?;
        let name = format!("clipft_row_norm_{suffix}");
        let func = dev.get_or_load_custom_func(&name, "clipft_clip_loss", PTX)?;
        // SAFETY: the kernel writes every value (one warp per row, every column).
        let y = unsafe { dev.alloc::<f32>(x.len())? };
        if rows == 0 {
            return Ok(y);
        }
        let (r, c) = (rows as i32, cols as i32);
        let mut l = func.builder();
        l.arg(x);
        l.arg(&y);
        l.arg(&r);
        l.arg(&c);
        // SAFETY: reads and writes rows x cols values (whole rows, checked); arguments in the
        // kernel's order and types.
        unsafe { l.launch(warps(rows)) }.w()?;
        Ok(y)
    }

    /// `clipft_row_norm_backward_<suffix>`: the gradient of `x` from `dy` (f32).
    pub fn row_norm_backward<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, f32>,
        cols: usize,
    ) -> Result<CudaSlice<T>> {
        let rows = super::rows_of(x.len(), cols)?;
        if dy.len() != x.len() {
            candle_core::bail!(
                "row norm backward: {} values, a gradient of {}",
                x.len(),
                dy.len()
            );
        }
        let name = format!("clipft_row_norm_backward_{suffix}");
        let func = dev.get_or_load_custom_func(&name, "clipft_clip_loss", PTX)?;
        // SAFETY: the kernel writes every value (one warp per row, every column).
        let dx = unsafe { dev.alloc::<T>(x.len())? };
        if rows == 0 {
            return Ok(dx);
        }
        let (r, c) = (rows as i32, cols as i32);
        let mut l = func.builder();
        l.arg(x);
        l.arg(dy);
        l.arg(&dx);
        l.arg(&r);
        l.arg(&c);
        // SAFETY: reads rows x cols values of x and dy (checked), writes as many of dx;
        // arguments in the kernel's order and types.
        unsafe { l.launch(warps(rows)) }.w()?;
        Ok(dx)
    }

    /// Runs `clipft_clip_ce_lse` over the `b x b` similarities: `(lse, terms)`, `2 b` each.
    fn lse(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        log_scale: &CudaView<'_, f32>,
        b: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let func = dev.get_or_load_custom_func("clipft_clip_ce_lse", "clipft_clip_loss", PTX)?;
        // SAFETY: the kernel writes all 2 b values of both (one warp per row and column).
        let (lse, terms) = unsafe { (dev.alloc::<f32>(2 * b)?, dev.alloc::<f32>(2 * b)?) };
        let bi = b as i32;
        let mut l = func.builder();
        l.arg(x);
        l.arg(log_scale);
        l.arg(&lse);
        l.arg(&terms);
        l.arg(&bi);
        // SAFETY: reads b x b values of x and one of log_scale (checked by the callers),
        // writes 2 b of lse and terms; arguments in the kernel's order and types.
        unsafe { l.launch(warps(2 * b)) }.w()?;
        Ok((lse, terms))
    }

    /// Runs `clipft_clip_ce_sum`: `factor * sum(v)` into `out[0]`.
    fn sum(
        dev: &CudaDevice,
        v: &CudaSlice<f32>,
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, f32>,
        factor: f32,
    ) -> Result<()> {
        let func = dev.get_or_load_custom_func("clipft_clip_ce_sum", "clipft_clip_loss", PTX)?;
        let n = v.len() as i32;
        let mut l = func.builder();
        l.arg(v);
        l.arg(out);
        l.arg(&n);
        l.arg(&factor);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads the n values of v, writes out[0] (callers pass at least one value);
        // arguments in the kernel's order and types.
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }

    fn checked(x: &CudaView<'_, f32>, log_scale: &CudaView<'_, f32>) -> Result<usize> {
        if log_scale.len() != 1 {
            candle_core::bail!("CLIPLoss: one logit scale, not {}", log_scale.len());
        }
        super::check_square(x.len())
    }

    /// The loss (one value) of the `b x b` similarities `x` at `log_scale` (one value).
    pub fn clip_ce(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        log_scale: &CudaView<'_, f32>,
    ) -> Result<CudaSlice<f32>> {
        let b = checked(x, log_scale)?;
        let (_, terms) = lse(dev, x, log_scale, b)?;
        // SAFETY: `sum` writes the one value.
        let mut out = unsafe { dev.alloc::<f32>(1)? };
        sum(dev, &terms, &mut out.slice_mut(..), 1.0 / (2 * b) as f32)?;
        Ok(out)
    }

    /// `b * b + 1` values for an upstream gradient `g` (one value): `dx`, then `d log_scale`.
    pub fn clip_ce_backward(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        log_scale: &CudaView<'_, f32>,
        g: &CudaView<'_, f32>,
    ) -> Result<CudaSlice<f32>> {
        let b = checked(x, log_scale)?;
        if g.len() != 1 {
            candle_core::bail!("CLIPLoss backward: one upstream gradient, not {}", g.len());
        }
        let (lse, _) = lse(dev, x, log_scale, b)?;
        let func =
            dev.get_or_load_custom_func("clipft_clip_ce_backward", "clipft_clip_loss", PTX)?;
        // SAFETY: the backward kernel writes the first b * b values and all b partials, the sum
        // kernel after it (same stream) the last value.
        let (mut out, partial) = unsafe { (dev.alloc::<f32>(b * b + 1)?, dev.alloc::<f32>(b)?) };
        let bi = b as i32;
        {
            let mut l = func.builder();
            l.arg(x);
            l.arg(log_scale);
            l.arg(&lse);
            l.arg(g);
            l.arg(&out);
            l.arg(&partial);
            l.arg(&bi);
            // SAFETY: reads b x b of x, 2 b of lse, one value of log_scale and g (checked);
            // writes the first b x b values of out and b of partial; arguments in the kernel's
            // order and types.
            unsafe { l.launch(warps(b)) }.w()?;
        }
        sum(dev, &partial, &mut out.slice_mut(b * b..), 1.0)?;
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{clip_ce, clip_ce_backward, row_norm, row_norm_backward};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twins_refuse_shapes_the_kernels_cannot_take() {
        assert!(row_norm_twin(&[1.0; 10], 3).is_err());
        assert!(row_norm_twin(&[1.0; 9], 0).is_err());
        assert!(row_norm_backward_twin(&[1.0; 9], &[1.0; 6], 3).is_err());
        assert!(clip_ce_twin(&[1.0; 8], 0.0).is_err());
        assert!(clip_ce_backward_twin(&[], 0.0, 1.0).is_err());
    }

    /// The summation orders the kernels use give the plain sums (to rounding).
    #[test]
    fn kernel_sums_are_sums() {
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let plain: f64 = v.iter().map(|&x| x as f64).sum();
        assert!((warp_sum(v.iter().copied()) as f64 - plain).abs() < 1e-4);
        assert!((clip_ce_sum_twin(&v, 0.5) as f64 - plain * 0.5).abs() < 1e-4);
    }
}
