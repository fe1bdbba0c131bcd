//! The CPU twins and launchers of `layernorm.cu`: layer normalisation over rows, forward and
//! backward (the input's gradient, and the weight's and bias's summed over rows).

use candle_core::{bail, Result};

use super::call::Call;

/// Rows per block of the backward: `NWARPS * RPW` in `layernorm.cu`.
const BACKWARD_ROWS: usize = 4 * 8;
/// The widest row the backward's shared-memory partial sums hold.
pub const NORM_MAX_COLS: usize = 1024;

/// Whether `layernorm.cu` takes rows of `cols` values.
pub fn norm_supports(cols: usize) -> bool {
    (1..=NORM_MAX_COLS).contains(&cols)
}

/// Checks rows of `cols` over `x` (whole rows) and per-column `w` (and `b`); returns the rows.
fn check(x: usize, w: usize, cols: usize) -> Result<usize> {
    if !norm_supports(cols) || w != cols || !x.is_multiple_of(cols) {
        bail!("layer norm over {cols} columns: {x} values and a weight of {w}");
    }
    match i32::try_from(x / cols) {
        Ok(_) => Ok(x / cols),
        Err(_) => bail!("layer norm: {} rows are too many", x / cols),
    }
}

/// The row's mean and `1 / sqrt(var + eps)`, two passes as the kernel.
fn stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row
        .iter()
        .fold(0f32, |a, x| (x - mean).mul_add(x - mean, a))
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `(x - mean) rstd w + b` per row, as `clipft_layernorm_*` computes it.
pub fn layer_norm_twin(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Result<Vec<f32>> {
    let cols = w.len();
    check(x.len(), w.len(), cols)?;
    if b.len() != cols {
        bail!("layer norm: a bias of {} for rows of {cols}", b.len());
    }
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks(cols).zip(y.chunks_mut(cols)) {
        let (mean, rstd) = stats(xr, eps);
        for (((y, x), w), b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
            *y = ((x - mean) * rstd).mul_add(*w, *b);
        }
    }
    Ok(y)
}

/// `h = x + b[col] + r` rounded by `round` (to the kernel's element type), then
/// [`layer_norm_twin`] of `h` with `w` and `lb`: `clipft_residual_layernorm_*`'s two outputs,
/// `h` then `y`, side by side.
pub fn residual_layer_norm_twin(
    x: &[f32],
    b: &[f32],
    r: &[f32],
    w: &[f32],
    lb: &[f32],
    eps: f32,
    round: fn(f32) -> f32,
) -> Result<Vec<f32>> {
    let cols = w.len();
    check(x.len(), cols, cols)?;
    if b.len() != cols || r.len() != x.len() {
        bail!(
            "residual layer norm: a bias of {} and a residual of {} for {} values in rows of {cols}",
            b.len(),
            r.len(),
            x.len()
        );
    }
    let mut out: Vec<f32> = x
        .chunks(cols)
        .zip(r.chunks(cols))
        .flat_map(|(xr, rr)| xr.iter().zip(b).zip(rr).map(|((x, b), r)| round(x + b + r)))
        .collect();
    let y = layer_norm_twin(&out, w, lb, eps)?;
    out.extend(y);
    Ok(out)
}

/// The backward of [`layer_norm_twin`] as `clipft_layernorm_backward_*` and `_sum_*` compute it:
/// `rows + 2` rows of `cols`, the input's gradient, then the weight's and the bias's (summed
/// per block of rows, then over blocks, in order).
pub fn layer_norm_backward_twin(x: &[f32], w: &[f32], dy: &[f32], eps: f32) -> Result<Vec<f32>> {
    let cols = w.len();
    let rows = check(x.len(), w.len(), cols)?;
    if dy.len() != x.len() {
        bail!(
            "layer norm backward: {} values and a gradient of {}",
            x.len(),
            dy.len()
        );
    }
    let n = cols as f32;
    let mut out = vec![0f32; (rows + 2) * cols];
    let (dx, sums) = out.split_at_mut(rows * cols);
    let mut block = vec![0f32; 2 * cols];
    let blocks = rows.div_ceil(BACKWARD_ROWS);
    for blk in 0..blocks {
        block.fill(0.0);
        for row in blk * BACKWARD_ROWS..rows.min((blk + 1) * BACKWARD_ROWS) {
            let xr = &x[row * cols..][..cols];
            let gr = &dy[row * cols..][..cols];
            let (mean, rstd) = stats(xr, eps);
            let (mut sg, mut sgx) = (0f32, 0f32);
            for c in 0..cols {
                let g = gr[c] * w[c];
                sg += g;
                sgx = g.mul_add((xr[c] - mean) * rstd, sgx);
            }
            let (mg, mgx) = (sg / n, sgx / n);
            for c in 0..cols {
                let xh = (xr[c] - mean) * rstd;
                dx[row * cols + c] = rstd * (gr[c] * w[c] - mg - xh * mgx);
                block[c] = gr[c].mul_add(xh, block[c]);
                block[cols + c] += gr[c];
            }
        }
        for (s, p) in sums.iter_mut().zip(&block) {
            *s += p;
        }
    }
    Ok(out)
}

/// A residual stream's gradient `dres` added to the norm's input gradient `dx` (the first
/// `dres.len()` values of a [`layer_norm_backward_twin`] output) as `clipft_layernorm_backward_*`
/// adds it: `dx` rounded to the element type (`round`), then the sum (which the caller rounds
/// again when it stores it), as the gradient and a separate add give.
pub fn add_residual_grad(dx: &mut [f32], dres: &[f32], round: impl Fn(f32) -> f32) {
    for (d, r) in dx.iter_mut().zip(dres) {
        *d = round(*d) + r;
    }
}

/// Warps per block of both kernels: `NWARPS` in `layernorm.cu`.
const NWARPS: u32 = 4;

/// `clipft_layernorm_<suffix>`: `y` from `x`, `rows` rows of `cols`, one warp per row.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    x: &'a I,
    w: &'a I,
    b: &'a I,
    y: &'a mut O,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Call<'a, I, O> {
    let grid = ((rows as u32).div_ceil(NWARPS), 1, 1);
    Call::new(format!("clipft_layernorm_{suffix}"), grid, NWARPS * 32)
        .input(x)
        .input(w)
        .input(b)
        .output(y)
        .i32(rows as i32)
        .i32(cols as i32)
        .f32(eps)
}

/// `clipft_residual_layernorm_<suffix>`: the residual stream `h = x + b + r` and its layer
/// norm `y` (weight `w`, bias `lb`), `rows` rows of `cols`, one warp per row.
#[allow(clippy::too_many_arguments)]
pub fn residual_layer_norm_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    [x, b, r, w, lb]: [&'a I; 5],
    h: &'a mut O,
    y: &'a mut O,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Call<'a, I, O> {
    let grid = ((rows as u32).div_ceil(NWARPS), 1, 1);
    Call::new(
        format!("clipft_residual_layernorm_{suffix}"),
        grid,
        NWARPS * 32,
    )
    .input(x)
    .input(b)
    .input(r)
    .input(w)
    .input(lb)
    .output(h)
    .output(y)
    .i32(rows as i32)
    .i32(cols as i32)
    .f32(eps)
}

/// Blocks of the backward over `rows` (at least one): the partial sums hold `blocks * 2 *
/// cols` values.
pub fn backward_blocks(rows: usize) -> usize {
    rows.div_ceil(BACKWARD_ROWS).max(1)
}

/// `clipft_layernorm_backward_<suffix>`: the input's gradient (plus `dres`, a residual
/// stream's gradient, where given) into the first `rows * cols` values of `dx`, and each
/// block's partial sums of the weight's and bias's gradients into `partial`. Its shared memory
/// holds 2 `cols` floats per warp.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    x: &'a I,
    w: &'a I,
    dy: &'a I,
    dres: Option<&'a I>,
    dx: &'a mut O,
    partial: &'a mut O,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Call<'a, I, O> {
    let grid = (backward_blocks(rows) as u32, 1, 1);
    Call::new(
        format!("clipft_layernorm_backward_{suffix}"),
        grid,
        NWARPS * 32,
    )
    .smem(NWARPS * 2 * cols as u32 * 4)
    .input(x)
    .input(w)
    .input(dy)
    .input_or_null(dres)
    .output(dx)
    .output(partial)
    .i32(rows as i32)
    .i32(cols as i32)
    .f32(eps)
}

/// `clipft_layernorm_backward_sum_<suffix>`: the blocks' partial sums added in order into the
/// `2 cols` values of `out` (the weight's gradient, then the bias's).
pub fn layer_norm_backward_sum_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    partial: &'a I,
    out: &'a mut O,
    rows: usize,
    cols: usize,
) -> Call<'a, I, O> {
    let grid = ((2 * cols as u32).div_ceil(256), 1, 1);
    Call::new(format!("clipft_layernorm_backward_sum_{suffix}"), grid, 256)
        .input(partial)
        .output(out)
        .i32(backward_blocks(rows) as i32)
        .i32(cols as i32)
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
    use candle_core::{CudaDevice, Result};

    use super::super::call::{self, CudaIn, CudaOut};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layernorm.ptx"));
    const MODULE: &str = "clipft_layernorm";

    /// `clipft_layernorm_<suffix>` over `x` (whole rows of `w.len()`).
    pub fn layer_norm<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        let cols = w.len();
        let rows = super::check(x.len(), cols, cols)?;
        if b.len() != cols {
            candle_core::bail!("layer norm: a bias of {} for rows of {cols}", b.len());
        }
        // SAFETY: the kernel writes every row (one warp each).
        let mut y = unsafe { dev.alloc::<T>(x.len())? };
        if rows == 0 {
            return Ok(y);
        }
        let call = super::layer_norm_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix, x, w, b, &mut y, rows, cols, eps,
        );
        // SAFETY: reads rows x cols of x (whole rows, checked) and cols of w and b, writes the
        // same of y.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(y)
    }

    /// `clipft_residual_layernorm_<suffix>` over `x` and `r` (whole rows of `w.len()`): `2 x
    /// len` values, the residual stream `x + b + r`, then its layer norm with `w` and `lb`.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_layer_norm<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        r: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        lb: &CudaView<'_, T>,
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        let cols = w.len();
        let rows = super::check(x.len(), cols, cols)?;
        if b.len() != cols || lb.len() != cols || r.len() != x.len() {
            candle_core::bail!(
                "residual layer norm: biases of {} and {}, a residual of {}, for {} values in \
                 rows of {cols}",
                b.len(),
                lb.len(),
                r.len(),
                x.len()
            );
        }
        // SAFETY: the kernel writes every row of both halves (one warp each).
        let mut out = unsafe { dev.alloc::<T>(2 * x.len())? };
        if rows == 0 {
            return Ok(out);
        }
        let Some((mut h, mut y)) = out.try_split_at_mut(x.len()) else {
            candle_core::bail!("residual layer norm: an output of {} values", 2 * x.len());
        };
        let call = super::residual_layer_norm_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix,
            [x, b, r, w, lb],
            &mut h,
            &mut y,
            rows,
            cols,
            eps,
        );
        // SAFETY: reads rows x cols of x and r (whole rows, checked) and cols of b, w and lb;
        // writes rows x cols values of h and of y, the two halves of `out`.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(out)
    }

    /// `clipft_layernorm_backward_<suffix>`, then `_sum_<suffix>`: `rows + 2` rows of `cols`,
    /// the input's gradient (plus `dres` where given), then the weight's and the bias's.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_backward<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        dres: Option<&CudaView<'_, T>>,
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        let cols = w.len();
        let rows = super::check(x.len(), cols, cols)?;
        let given = [Some(dy.len()), dres.map(|r| r.len())];
        if let Some(n) = given.into_iter().flatten().find(|&n| n != x.len()) {
            candle_core::bail!(
                "layer norm backward: {} values and a gradient of {n}",
                x.len()
            );
        }
        let blocks = super::backward_blocks(rows);
        // SAFETY: every value is written before anything reads it: the backward kernel writes
        // all rows x cols values of the input's gradient (one warp per row) and all 2 cols
        // partial sums of each of its blocks (zeros for rows it does not have); the sum kernel,
        // after it on the same stream, reads the partials and writes the last 2 cols values.
        let (mut out, mut partial) = unsafe {
            (
                dev.alloc::<T>((rows + 2) * cols)?,
                dev.alloc::<f32>(blocks * 2 * cols)?,
            )
        };
        let dres = dres.map(|r| r as &dyn CudaIn);
        let call = super::layer_norm_backward_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix,
            x,
            w,
            dy,
            dres,
            &mut out,
            &mut partial,
            rows,
            cols,
            eps,
        );
        // SAFETY: reads rows x cols of x, dy and dres (checked) and cols of w; writes the first
        // rows x cols values of `out` (which holds rows + 2 rows) and blocks x 2 cols of
        // `partial`; cols <= 1024 keeps the shared memory at 32 KB.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        let mut tail = out.slice_mut(rows * cols..);
        let call = super::layer_norm_backward_sum_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix, &partial, &mut tail, rows, cols,
        );
        // SAFETY: reads blocks x 2 cols of `partial`, writes the 2 cols values of `tail` (the
        // last two rows of `out`).
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{layer_norm, layer_norm_backward, residual_layer_norm};

/// `layernorm.cu` itself, run by the CPU emulator with the launchers' grids, shared memory and
/// arguments, in each type, against the twins.
#[cfg(test)]
mod emu_tests {
    use super::super::call::emu::{self, assert_close, values, written, Dt, EmuArg};
    use super::*;

    #[test]
    fn emulated_residual_norm_matches_its_twin() {
        for (rows, cols) in [(9, 40), (6, 768)] {
            for dt in Dt::ALL {
                let what = format!("{dt:?} {rows}x{cols}");
                let n = rows * cols;
                let (x, r) = (dt.round_all(&values(n, 1)), dt.round_all(&values(n, 2)));
                let [b, w, lb] = [3, 4, 5].map(|s| dt.round_all(&values(cols, s)));
                let ins = [&x, &b, &r, &w, &lb].map(|v| dt.buffer(v));
                let (mut h, mut y) = (dt.poisoned(n), dt.poisoned(n));
                let call = residual_layer_norm_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    [&*ins[0], &*ins[1], &*ins[2], &*ins[3], &*ins[4]],
                    &mut *h,
                    &mut *y,
                    rows,
                    cols,
                    1e-5,
                );
                // SAFETY: x, r, h and y hold rows x cols values, b, w and lb cols.
                unsafe { emu::run(call) }.unwrap();
                let round = match dt {
                    Dt::F32 => |v: f32| v,
                    Dt::F16 => |v: f32| Dt::F16.round(v),
                    Dt::Bf16 => |v: f32| Dt::Bf16.round(v),
                };
                let want = residual_layer_norm_twin(&x, &b, &r, &w, &lb, 1e-5, round).unwrap();
                let (want_h, want_y) = want.split_at(n);
                assert_close(&format!("h {what}"), &written("h", &*h), want_h, 1e-6);
                let want_y = dt.round_all(want_y);
                assert_close(&format!("y {what}"), &written("y", &*y), &want_y, dt.tol());
            }
        }
    }

    #[test]
    fn emulated_kernels_match_their_twins() {
        // Two blocks of the backward and a ragged last one; the widest rows, and narrow ones
        // that leave lanes idle.
        for (rows, cols) in [(2 * BACKWARD_ROWS + 5, 40), (7, NORM_MAX_COLS)] {
            for dt in Dt::ALL {
                let what = format!("{dt:?} {rows}x{cols}");
                let x = dt.round_all(&values(rows * cols, 1));
                let w = dt.round_all(&values(cols, 2));
                let b = dt.round_all(&values(cols, 3));
                let dy = dt.round_all(&values(rows * cols, 4));
                let (dx_, dw, db, ddy) =
                    (dt.buffer(&x), dt.buffer(&w), dt.buffer(&b), dt.buffer(&dy));
                let mut y = dt.poisoned(rows * cols);
                let call = layer_norm_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    &*dx_,
                    &*dw,
                    &*db,
                    &mut *y,
                    rows,
                    cols,
                    1e-5,
                );
                // SAFETY: x and y hold rows x cols values, w and b cols.
                unsafe { emu::run(call) }.unwrap();
                let want = dt.round_all(&layer_norm_twin(&x, &w, &b, 1e-5).unwrap());
                assert_close(
                    &format!("layer norm {what}"),
                    &written("y", &*y),
                    &want,
                    dt.tol(),
                );

                // The input's gradient alone, and with a residual stream's gradient added.
                let res = dt.round_all(&values(rows * cols, 5));
                for with_res in [false, true] {
                    let dres = with_res.then(|| dt.buffer(&res));
                    let mut grad = dt.poisoned(rows * cols);
                    let mut partial = Dt::F32.poisoned(backward_blocks(rows) * 2 * cols);
                    let call = layer_norm_backward_call::<dyn EmuArg, dyn EmuArg>(
                        dt.suffix(),
                        &*dx_,
                        &*dw,
                        &*ddy,
                        dres.as_deref(),
                        &mut *grad,
                        &mut *partial,
                        rows,
                        cols,
                        1e-5,
                    );
                    // SAFETY: x, dy and the gradient hold rows x cols values, w cols, partial
                    // blocks x 2 cols.
                    unsafe { emu::run(call) }.unwrap();
                    written("partial", &*partial);
                    let mut sums = dt.poisoned(2 * cols);
                    let call = layer_norm_backward_sum_call::<dyn EmuArg, dyn EmuArg>(
                        dt.suffix(),
                        &*partial,
                        &mut *sums,
                        rows,
                        cols,
                    );
                    // SAFETY: partial holds blocks x 2 cols values, sums 2 cols.
                    unsafe { emu::run(call) }.unwrap();
                    let mut want = layer_norm_backward_twin(&x, &w, &dy, 1e-5).unwrap();
                    if with_res {
                        let (dx, _) = want.split_at_mut(rows * cols);
                        add_residual_grad(dx, &res, |v| dt.round(v));
                    }
                    let want = dt.round_all(&want);
                    let (want_dx, want_sums) = want.split_at(rows * cols);
                    assert_close(
                        &format!("dx {what}, residual {with_res}"),
                        &written("dx", &*grad),
                        want_dx,
                        dt.tol(),
                    );
                    let got = written("sums", &*sums);
                    assert_close(&format!("dw, db {what}"), &got, want_sums, dt.tol());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 layer norm and its gradients by the textbook formulas.
    fn reference(x: &[f32], w: &[f32], b: &[f32], dy: &[f32], eps: f64) -> (Vec<f64>, Vec<f64>) {
        let cols = w.len();
        let rows = x.len() / cols;
        let mut y = vec![0f64; x.len()];
        let mut grads = vec![0f64; (rows + 2) * cols];
        for r in 0..rows {
            let xr: Vec<f64> = x[r * cols..][..cols].iter().map(|&v| v as f64).collect();
            let mean = xr.iter().sum::<f64>() / cols as f64;
            let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let xh: Vec<f64> = xr.iter().map(|v| (v - mean) * rstd).collect();
            let g: Vec<f64> = (0..cols)
                .map(|c| dy[r * cols + c] as f64 * w[c] as f64)
                .collect();
            let mg = g.iter().sum::<f64>() / cols as f64;
            let mgx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / cols as f64;
            for c in 0..cols {
                y[r * cols + c] = xh[c] * w[c] as f64 + b[c] as f64;
                grads[r * cols + c] = rstd * (g[c] - mg - xh[c] * mgx);
                grads[rows * cols + c] += dy[r * cols + c] as f64 * xh[c];
                grads[(rows + 1) * cols + c] += dy[r * cols + c] as f64;
            }
        }
        (y, grads)
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.377 + seed).sin() * 2.0 + 0.3)
            .collect()
    }

    /// Both twins against f64, over more rows than one backward block and a row width that is
    /// not a multiple of 32.
    #[test]
    fn twins_match_the_formulas() -> Result<()> {
        for (rows, cols) in [(70, 96), (5, 50)] {
            let (x, dy) = (values(rows * cols, 0.1), values(rows * cols, 2.3));
            let (w, b) = (values(cols, 1.1), values(cols, 0.4));
            let (y, g) = reference(&x, &w, &b, &dy, 1e-5);
            let got = layer_norm_twin(&x, &w, &b, 1e-5)?;
            let err = got
                .iter()
                .zip(&y)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0f64, f64::max);
            assert!(err < 1e-5, "forward {rows}x{cols}: {err}");
            let got = layer_norm_backward_twin(&x, &w, &dy, 1e-5)?;
            for (i, (a, b)) in got.iter().zip(&g).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 2e-4 * (1.0 + b.abs()),
                    "backward {i}: {a} vs {b}"
                );
            }
        }
        assert!(layer_norm_twin(&[0.0; 10], &[1.0; 4], &[0.0; 4], 1e-5).is_err());
        assert!(layer_norm_backward_twin(&[0.0; 8], &[1.0; 4], &[0.0; 4], 1e-5).is_err());
        assert!(layer_norm_twin(&[0.0; 2048], &[1.0; 2048], &[0.0; 2048], 1e-5).is_err());
        Ok(())
    }
}
