//! The CPU twins and launchers of `clip_loss.cu` (see its header): the rows' L2 normalisation
//! and the symmetric cross-entropy of CLIPLoss, forward and backward. Each twin follows its
//! kernel's summation order (lane-strided partial sums, the warp's butterfly, one block's tree),
//! so the two agree to rounding.

use candle_core::{bail, Result};

use super::call::Call;

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

/// Warps per block of the one-warp-per-row kernels: `WARPS` in `clip_loss.cu`.
const WARPS: u32 = 4;

/// The grid of a one-warp-per-row kernel over `n` rows.
fn warps(n: usize) -> (u32, u32, u32) {
    ((n as u32).div_ceil(WARPS).max(1), 1, 1)
}

/// `clipft_row_norm_<suffix>`: `y = x / |x|` (f32) over `rows` rows of `cols`.
pub fn row_norm_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    x: &'a I,
    y: &'a mut O,
    rows: usize,
    cols: usize,
) -> Call<'a, I, O> {
    Call::new(format!("clipft_row_norm_{suffix}"), warps(rows), WARPS * 32)
        .input(x)
        .output(y)
        .i32(rows as i32)
        .i32(cols as i32)
}

/// `clipft_row_norm_backward_<suffix>`: `dx` (in x's type) from `dy` (f32).
pub fn row_norm_backward_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    x: &'a I,
    dy: &'a I,
    dx: &'a mut O,
    rows: usize,
    cols: usize,
) -> Call<'a, I, O> {
    let name = format!("clipft_row_norm_backward_{suffix}");
    Call::new(name, warps(rows), WARPS * 32)
        .input(x)
        .input(dy)
        .output(dx)
        .i32(rows as i32)
        .i32(cols as i32)
}

/// `clipft_clip_ce_lse`: the log-sum-exp of each row and column of the `b x b` similarities
/// `x` scaled by `exp(log_scale[0])`, and each one's term of the loss (`2 b` values each).
pub fn clip_ce_lse_call<'a, I: ?Sized, O: ?Sized>(
    x: &'a I,
    log_scale: &'a I,
    lse: &'a mut O,
    terms: &'a mut O,
    b: usize,
) -> Call<'a, I, O> {
    Call::new("clipft_clip_ce_lse", warps(2 * b), WARPS * 32)
        .input(x)
        .input(log_scale)
        .output(lse)
        .output(terms)
        .i32(b as i32)
}

/// `clipft_clip_ce_sum`: `out[0] = factor * sum(v[0..n])`, one block.
pub fn clip_ce_sum_call<'a, I: ?Sized, O: ?Sized>(
    v: &'a I,
    out: &'a mut O,
    n: usize,
    factor: f32,
) -> Call<'a, I, O> {
    Call::new("clipft_clip_ce_sum", (1, 1, 1), 256)
        .input(v)
        .output(out)
        .i32(n as i32)
        .f32(factor)
}

/// `clipft_clip_ce_backward`: the similarities' gradient into the first `b * b` values of
/// `dx` and each row's share of the logit scale's into `partial` (`b`), for the loss's
/// gradient `g[0]`, from the rows' and columns' `lse`.
#[allow(clippy::too_many_arguments)]
pub fn clip_ce_backward_call<'a, I: ?Sized, O: ?Sized>(
    x: &'a I,
    log_scale: &'a I,
    lse: &'a I,
    g: &'a I,
    dx: &'a mut O,
    partial: &'a mut O,
    b: usize,
) -> Call<'a, I, O> {
    Call::new("clipft_clip_ce_backward", warps(b), WARPS * 32)
        .input(x)
        .input(log_scale)
        .input(lse)
        .input(g)
        .output(dx)
        .output(partial)
        .i32(b as i32)
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
    use candle_core::{CudaDevice, Result};

    use super::super::call::{self, CudaIn, CudaOut};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/clip_loss.ptx"));
    const MODULE: &str = "clipft_clip_loss";

    /// `clipft_row_norm_<suffix>`: `x / |x|` per row of `cols`, in f32.
    pub fn row_norm<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        cols: usize,
    ) -> Result<CudaSlice<f32>> {
        let rows = super::rows_of(x.len(), cols)?;
        // SAFETY: the kernel writes every value (one warp per row, every column).
        let mut y = unsafe { dev.alloc::<f32>(x.len())? };
        if rows == 0 {
            return Ok(y);
        }
        let call = super::row_norm_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix, x, &mut y, rows, cols,
        );
        // SAFETY: reads and writes rows x cols values (whole rows, checked).
        unsafe { call::run(dev, MODULE, PTX, call) }?;
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
        // SAFETY: the kernel writes every value (one warp per row, every column).
        let mut dx = unsafe { dev.alloc::<T>(x.len())? };
        if rows == 0 {
            return Ok(dx);
        }
        let call = super::row_norm_backward_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix, x, dy, &mut dx, rows, cols,
        );
        // SAFETY: reads rows x cols values of x and dy (checked), writes as many of dx.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(dx)
    }

    /// Runs `clipft_clip_ce_lse` over the `b x b` similarities: `(lse, terms)`, `2 b` each.
    fn lse(
        dev: &CudaDevice,
        x: &CudaView<'_, f32>,
        log_scale: &CudaView<'_, f32>,
        b: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        // SAFETY: the kernel writes all 2 b values of both (one warp per row and column).
        let (mut lse, mut terms) = unsafe { (dev.alloc::<f32>(2 * b)?, dev.alloc::<f32>(2 * b)?) };
        let call = super::clip_ce_lse_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            x, log_scale, &mut lse, &mut terms, b,
        );
        // SAFETY: reads b x b values of x and one of log_scale (checked by the callers),
        // writes 2 b of lse and terms.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok((lse, terms))
    }

    /// Runs `clipft_clip_ce_sum`: `factor * sum(v)` into `out[0]`.
    fn sum(
        dev: &CudaDevice,
        v: &CudaSlice<f32>,
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, f32>,
        factor: f32,
    ) -> Result<()> {
        let call =
            super::clip_ce_sum_call::<dyn CudaIn + '_, dyn CudaOut + '_>(v, out, v.len(), factor);
        // SAFETY: reads the n values of v, writes out[0] (callers pass at least one value).
        unsafe { call::run(dev, MODULE, PTX, call) }
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
        // SAFETY: the backward kernel writes the first b * b values and all b partials, the sum
        // kernel after it (same stream) the last value.
        let (mut out, mut partial) =
            unsafe { (dev.alloc::<f32>(b * b + 1)?, dev.alloc::<f32>(b)?) };
        let call = super::clip_ce_backward_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            x,
            log_scale,
            &lse,
            g,
            &mut out,
            &mut partial,
            b,
        );
        // SAFETY: reads b x b of x, 2 b of lse, one value of log_scale and g (checked); writes
        // the first b x b values of out and b of partial.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        sum(dev, &partial, &mut out.slice_mut(b * b..), 1.0)?;
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{clip_ce, clip_ce_backward, row_norm, row_norm_backward};

/// `clip_loss.cu` itself, run by the CPU emulator with the launchers' grids and arguments,
/// against the twins (which follow its summation order).
#[cfg(test)]
mod emu_tests {
    use super::super::call::emu::{self, assert_close, values, written, Dt, EmuArg};
    use super::*;

    #[test]
    fn emulated_row_norms_match_their_twins() {
        // Rows narrower and wider than a warp, a ragged last block.
        for (rows, cols) in [(7, 20), (6, 512)] {
            for dt in Dt::ALL {
                let what = format!("{dt:?} {rows}x{cols}");
                let x = dt.round_all(&values(rows * cols, 5));
                let dy = values(rows * cols, 6);
                let (dx_, ddy) = (dt.buffer(&x), Dt::F32.buffer(&dy));
                let mut y = Dt::F32.poisoned(rows * cols);
                let call = row_norm_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    &*dx_,
                    &mut *y,
                    rows,
                    cols,
                );
                // SAFETY: x and y hold rows x cols values.
                unsafe { emu::run(call) }.unwrap();
                let want = row_norm_twin(&x, cols).unwrap();
                assert_close(&format!("row norm {what}"), &written("y", &*y), &want, 2e-6);
                let mut dx = dt.poisoned(rows * cols);
                let call = row_norm_backward_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    &*dx_,
                    &*ddy,
                    &mut *dx,
                    rows,
                    cols,
                );
                // SAFETY: x, dy and dx hold rows x cols values.
                unsafe { emu::run(call) }.unwrap();
                let want = dt.round_all(&row_norm_backward_twin(&x, &dy, cols).unwrap());
                assert_close(
                    &format!("row norm backward {what}"),
                    &written("dx", &*dx),
                    &want,
                    dt.tol(),
                );
            }
        }
    }

    #[test]
    fn emulated_cross_entropy_matches_its_twin() {
        // A batch that is not a multiple of the warps, over one warp wide; the sum's 256
        // threads with values left over.
        for b in [37usize, 300] {
            let x: Vec<f32> = values(b * b, 7).iter().map(|v| v / 2.5).collect();
            let log_scale = 20f32.ln();
            let (dx_, dscale, dg) = (
                Dt::F32.buffer(&x),
                Dt::F32.buffer(&[log_scale]),
                Dt::F32.buffer(&[0.75]),
            );
            let (mut lse, mut terms) = (Dt::F32.poisoned(2 * b), Dt::F32.poisoned(2 * b));
            let call = clip_ce_lse_call::<dyn EmuArg, dyn EmuArg>(
                &*dx_,
                &*dscale,
                &mut *lse,
                &mut *terms,
                b,
            );
            // SAFETY: x holds b x b values, lse and terms 2 b, the scale one.
            unsafe { emu::run(call) }.unwrap();
            let (want_lse, want_terms) = clip_ce_lse_twin(&x, log_scale).unwrap();
            assert_close("lse", &written("lse", &*lse), &want_lse, 2e-6);
            assert_close("terms", &written("terms", &*terms), &want_terms, 2e-6);
            let mut loss = Dt::F32.poisoned(1);
            let factor = 1.0 / (2 * b) as f32;
            let call =
                clip_ce_sum_call::<dyn EmuArg, dyn EmuArg>(&*terms, &mut *loss, 2 * b, factor);
            // SAFETY: terms holds 2 b values, loss one.
            unsafe { emu::run(call) }.unwrap();
            let want = clip_ce_twin(&x, log_scale).unwrap();
            assert_close("loss", &written("loss", &*loss), &[want], 2e-6);

            let mut grad = Dt::F32.poisoned(b * b);
            let mut partial = Dt::F32.poisoned(b);
            let call = clip_ce_backward_call::<dyn EmuArg, dyn EmuArg>(
                &*dx_,
                &*dscale,
                &*lse,
                &*dg,
                &mut *grad,
                &mut *partial,
                b,
            );
            // SAFETY: x and the gradient hold b x b values, lse 2 b, partial b, the scale and g
            // one each.
            unsafe { emu::run(call) }.unwrap();
            let mut dscale_out = Dt::F32.poisoned(1);
            let call =
                clip_ce_sum_call::<dyn EmuArg, dyn EmuArg>(&*partial, &mut *dscale_out, b, 1.0);
            // SAFETY: partial holds b values, the output one.
            unsafe { emu::run(call) }.unwrap();
            let want = clip_ce_backward_twin(&x, log_scale, 0.75).unwrap();
            assert_close("dx", &written("dx", &*grad), &want[..b * b], 2e-6);
            assert_close(
                "d log_scale",
                &written("d scale", &*dscale_out),
                &want[b * b..],
                2e-6,
            );
        }
    }
}

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
