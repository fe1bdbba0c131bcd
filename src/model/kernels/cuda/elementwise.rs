//! The CPU twins and launchers of `elementwise.cu`: a linear layer's tail (bias + activation,
//! its backward, bias + residual) in one pass over its output.

use candle_core::{bail, Result};

use super::call::Call;

/// The activation `bias_act` applies (the kernel's `act` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Act {
    Identity = 0,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu = 1,
    /// `0.5 x (1 + erf(x / sqrt 2))` (OpenCLIP/LAION).
    Gelu = 2,
}

impl Act {
    /// The kernel's formula for one value.
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Act::Identity => v,
            Act::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
            Act::Gelu => 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2)),
        }
    }

    /// The kernel's formula for the derivative at one value.
    pub fn derivative(self, v: f32) -> f32 {
        match self {
            Act::Identity => 1.0,
            Act::QuickGelu => {
                let sg = 1.0 / (1.0 + (-1.702 * v).exp());
                sg + 1.702 * v * sg * (1.0 - sg)
            }
            Act::Gelu => {
                // 1 / sqrt(2 pi)
                const INV_SQRT_2PI: f32 = 0.398_942_3;
                0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
                    + v * INV_SQRT_2PI * (-0.5 * v * v).exp()
            }
        }
    }
}

/// erf in f32 as candle's CPU `gelu_erf` computes it (CUDA's `erff` agrees within rounding).
fn erf(x: f32) -> f32 {
    candle_core::cpu::erf::erf_f32(x)
}

/// Checks a rows x `cols` problem: `x` holds whole rows, `b` one per column.
fn check(x: usize, b: usize, cols: usize) -> Result<()> {
    if cols == 0 || b != cols || !x.is_multiple_of(cols) {
        bail!("bias over {cols} columns: {x} values and a bias of {b}");
    }
    if i32::try_from(cols).is_err() {
        bail!("bias over {cols} columns: too wide");
    }
    Ok(())
}

/// `act(x + b[col])`, as `clipft_bias_act_*` computes it.
pub fn bias_act_twin(x: &[f32], b: &[f32], act: Act) -> Result<Vec<f32>> {
    check(x.len(), b.len(), b.len())?;
    Ok(x.chunks(b.len())
        .flat_map(|row| row.iter().zip(b).map(move |(v, c)| act.apply(v + c)))
        .collect())
}

/// `dy * act'(x + b[col])`, as `clipft_bias_act_backward_*` computes it.
pub fn bias_act_backward_twin(x: &[f32], b: &[f32], dy: &[f32], act: Act) -> Result<Vec<f32>> {
    check(x.len(), b.len(), b.len())?;
    if dy.len() != x.len() {
        bail!(
            "bias + activation backward: {} values and a gradient of {}",
            x.len(),
            dy.len()
        );
    }
    Ok(x.chunks(b.len())
        .zip(dy.chunks(b.len()))
        .flat_map(|(row, g)| {
            row.iter()
                .zip(b)
                .zip(g)
                .map(move |((v, c), g)| g * act.derivative(v + c))
        })
        .collect())
}

/// Rows per partial sum of `clipft_column_sum_partial_*`.
pub const COLSUM_ROWS: usize = 64;

/// Whether the column sum takes `rows` rows (its grid has one row of blocks per 64 rows, at
/// most 65535).
pub fn column_sum_supports(rows: usize) -> bool {
    rows.div_ceil(COLSUM_ROWS) <= 65_535
}

/// The sum over rows of each of `cols` columns of `g` (whole rows), as
/// `clipft_column_sum_partial_*` and `_total_*` compute it: a partial per chunk of
/// [`COLSUM_ROWS`] rows, then the partials in chunk order.
pub fn column_sum_twin(g: &[f32], cols: usize) -> Result<Vec<f32>> {
    check(g.len(), cols, cols)?;
    let mut total = vec![0f32; cols];
    for chunk in g.chunks(COLSUM_ROWS * cols) {
        let mut partial = vec![0f32; cols];
        for row in chunk.chunks(cols) {
            for (p, v) in partial.iter_mut().zip(row) {
                *p += v;
            }
        }
        for (t, p) in total.iter_mut().zip(&partial) {
            *t += p;
        }
    }
    Ok(total)
}

/// `x + b[col] + r`, as `clipft_bias_residual_*` computes it.
pub fn bias_residual_twin(x: &[f32], b: &[f32], r: &[f32]) -> Result<Vec<f32>> {
    check(x.len(), b.len(), b.len())?;
    if r.len() != x.len() {
        bail!(
            "bias + residual: {} values and a residual of {}",
            x.len(),
            r.len()
        );
    }
    Ok(x.chunks(b.len())
        .zip(r.chunks(b.len()))
        .flat_map(|(row, res)| row.iter().zip(b).zip(res).map(|((v, c), r)| v + c + r))
        .collect())
}

/// Grid of a grid-stride loop over `n` values: enough blocks of 256 to fill an H100 several
/// times over.
fn grid_stride(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, 132 * 32) as u32, 1, 1)
}

/// `clipft_bias_act_<suffix>`: `y = act(x + b[col])` over the `n` values of `x` (rows of
/// `cols`).
#[allow(clippy::too_many_arguments)]
pub fn bias_act_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    x: &'a I,
    b: &'a I,
    y: &'a mut O,
    n: usize,
    cols: usize,
    act: Act,
) -> Call<'a, I, O> {
    Call::new(format!("clipft_bias_act_{suffix}"), grid_stride(n), 256)
        .input(x)
        .input(b)
        .output(y)
        .i64(n as i64)
        .i32(cols as i32)
        .i32(act as i32)
}

/// `clipft_bias_act_backward_<suffix>`: `dz = dy * act'(x + b[col])`.
#[allow(clippy::too_many_arguments)]
pub fn bias_act_backward_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    x: &'a I,
    b: &'a I,
    dy: &'a I,
    dz: &'a mut O,
    n: usize,
    cols: usize,
    act: Act,
) -> Call<'a, I, O> {
    Call::new(
        format!("clipft_bias_act_backward_{suffix}"),
        grid_stride(n),
        256,
    )
    .input(x)
    .input(b)
    .input(dy)
    .output(dz)
    .i64(n as i64)
    .i32(cols as i32)
    .i32(act as i32)
}

/// `clipft_bias_residual_<suffix>`: `y = x + b[col] + r`.
pub fn bias_residual_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    x: &'a I,
    b: &'a I,
    r: &'a I,
    y: &'a mut O,
    n: usize,
    cols: usize,
) -> Call<'a, I, O> {
    Call::new(
        format!("clipft_bias_residual_{suffix}"),
        grid_stride(n),
        256,
    )
    .input(x)
    .input(b)
    .input(r)
    .output(y)
    .i64(n as i64)
    .i32(cols as i32)
}

/// Chunks of [`COLSUM_ROWS`] rows in a column sum over `rows` (at least one): the length of
/// its partial sums is `chunks * cols`.
pub fn column_sum_chunks(rows: usize) -> usize {
    rows.div_ceil(COLSUM_ROWS).max(1)
}

/// `clipft_column_sum_partial_<suffix>`: a partial sum per chunk of rows and column of `g`
/// into `partial`.
pub fn column_sum_partial_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    g: &'a I,
    partial: &'a mut O,
    rows: usize,
    cols: usize,
) -> Call<'a, I, O> {
    let grid = (
        (cols as u32).div_ceil(256),
        column_sum_chunks(rows) as u32,
        1,
    );
    Call::new(format!("clipft_column_sum_partial_{suffix}"), grid, 256)
        .input(g)
        .output(partial)
        .i64(rows as i64)
        .i32(cols as i32)
}

/// `clipft_column_sum_total_<suffix>`: the partials of [`column_sum_partial_call`] added in
/// chunk order into `out` (one value per column).
pub fn column_sum_total_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    partial: &'a I,
    out: &'a mut O,
    rows: usize,
    cols: usize,
) -> Call<'a, I, O> {
    let grid = ((cols as u32).div_ceil(256), 1, 1);
    Call::new(format!("clipft_column_sum_total_{suffix}"), grid, 256)
        .input(partial)
        .output(out)
        .i32(column_sum_chunks(rows) as i32)
        .i32(cols as i32)
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
    use candle_core::{CudaDevice, Result};

    use super::super::call::{self, CudaIn, CudaOut};
    use super::Act;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
    const MODULE: &str = "clipft_elementwise";

    /// `clipft_bias_act_<suffix>` over `x` (whole rows of `b.len()`).
    pub fn bias_act<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        act: Act,
    ) -> Result<CudaSlice<T>> {
        super::check(x.len(), b.len(), b.len())?;
        // SAFETY: the kernel writes every one of the x.len() values.
        let mut y = unsafe { dev.alloc::<T>(x.len())? };
        if !x.is_empty() {
            let call = super::bias_act_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
                suffix,
                x,
                b,
                &mut y,
                x.len(),
                b.len(),
                act,
            );
            // SAFETY: reads x[0..n] and b[0..cols] (x holds whole rows of cols, checked), writes
            // y[0..n].
            unsafe { call::run(dev, MODULE, PTX, call) }?;
        }
        Ok(y)
    }

    /// `clipft_bias_act_backward_<suffix>` over `x` and `dy` (whole rows of `b.len()`).
    pub fn bias_act_backward<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        act: Act,
    ) -> Result<CudaSlice<T>> {
        super::check(x.len(), b.len(), b.len())?;
        if dy.len() != x.len() {
            candle_core::bail!(
                "bias + activation backward: {} values and a gradient of {}",
                x.len(),
                dy.len()
            );
        }
        // SAFETY: the kernel writes every one of the x.len() values.
        let mut dz = unsafe { dev.alloc::<T>(x.len())? };
        if !x.is_empty() {
            let call = super::bias_act_backward_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
                suffix,
                x,
                b,
                dy,
                &mut dz,
                x.len(),
                b.len(),
                act,
            );
            // SAFETY: reads x[0..n], dy[0..n] (same length, checked) and b[0..cols] (x holds
            // whole rows of cols), writes dz[0..n].
            unsafe { call::run(dev, MODULE, PTX, call) }?;
        }
        Ok(dz)
    }

    /// `clipft_column_sum_partial_<suffix>`, then `_total_<suffix>`: the column sums of `g`
    /// (whole rows of `cols`), in `g`'s type.
    pub fn column_sum<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        g: &CudaView<'_, T>,
        cols: usize,
    ) -> Result<CudaSlice<T>> {
        super::check(g.len(), cols, cols)?;
        let rows = g.len() / cols;
        if !super::column_sum_supports(rows) {
            candle_core::bail!("column sum: {rows} rows are too many");
        }
        let chunks = super::column_sum_chunks(rows);
        // SAFETY: the first kernel writes a partial for every (chunk, column) (zero for a
        // chunk without rows) before the second, on the same stream, reads them; the second
        // writes every column of `out`.
        let (mut partial, mut out) =
            unsafe { (dev.alloc::<f32>(chunks * cols)?, dev.alloc::<T>(cols)?) };
        let call = super::column_sum_partial_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix,
            g,
            &mut partial,
            rows,
            cols,
        );
        // SAFETY: reads rows x cols of g (whole rows, checked), writes chunks x cols of
        // `partial`; chunks <= 65535 (checked).
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        let call = super::column_sum_total_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix, &partial, &mut out, rows, cols,
        );
        // SAFETY: reads chunks x cols of `partial`, writes cols of `out`.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(out)
    }

    /// `clipft_bias_residual_<suffix>` over `x` and `r` (whole rows of `b.len()`).
    pub fn bias_residual<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        r: &CudaView<'_, T>,
    ) -> Result<CudaSlice<T>> {
        super::check(x.len(), b.len(), b.len())?;
        if r.len() != x.len() {
            candle_core::bail!(
                "bias + residual: {} values and a residual of {}",
                x.len(),
                r.len()
            );
        }
        // SAFETY: the kernel writes every one of the x.len() values.
        let mut y = unsafe { dev.alloc::<T>(x.len())? };
        if !x.is_empty() {
            let call = super::bias_residual_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
                suffix,
                x,
                b,
                r,
                &mut y,
                x.len(),
                b.len(),
            );
            // SAFETY: reads x[0..n], r[0..n] (same length, checked) and b[0..cols], writes
            // y[0..n].
            unsafe { call::run(dev, MODULE, PTX, call) }?;
        }
        Ok(y)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{bias_act, bias_act_backward, bias_residual, column_sum};

/// `elementwise.cu` itself, run by the CPU emulator with the launchers' grids and arguments,
/// in each type, against the twins (inputs rounded to the type, outputs too).
#[cfg(test)]
mod emu_tests {
    use super::super::call::emu::{self, assert_close, values, written, Dt, EmuArg};
    use super::*;

    #[test]
    fn emulated_kernels_match_their_twins() {
        // Three chunks of rows for the column sum, two tiles of 256 columns.
        let (rows, cols) = (2 * COLSUM_ROWS + 3, 300);
        let n = rows * cols;
        for dt in Dt::ALL {
            let x = dt.round_all(&values(n, 1));
            let b = dt.round_all(&values(cols, 2));
            let r = dt.round_all(&values(n, 3));
            let (dx, db, dr) = (dt.buffer(&x), dt.buffer(&b), dt.buffer(&r));
            for act in [Act::Identity, Act::QuickGelu, Act::Gelu] {
                let what = format!("{dt:?} {act:?}");
                let mut y = dt.poisoned(n);
                let call = bias_act_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    &*dx,
                    &*db,
                    &mut *y,
                    n,
                    cols,
                    act,
                );
                // SAFETY: x and y hold n values, whole rows of cols; b holds cols.
                unsafe { emu::run(call) }.unwrap();
                let want = dt.round_all(&bias_act_twin(&x, &b, act).unwrap());
                assert_close(
                    &format!("bias_act {what}"),
                    &written("y", &*y),
                    &want,
                    dt.tol(),
                );

                let mut dz = dt.poisoned(n);
                let call = bias_act_backward_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    &*dx,
                    &*db,
                    &*dr,
                    &mut *dz,
                    n,
                    cols,
                    act,
                );
                // SAFETY: x, dy (r) and dz hold n values, whole rows of cols; b holds cols.
                unsafe { emu::run(call) }.unwrap();
                let want = dt.round_all(&bias_act_backward_twin(&x, &b, &r, act).unwrap());
                let got = written("dz", &*dz);
                assert_close(&format!("bias_act_backward {what}"), &got, &want, dt.tol());
            }
            let mut y = dt.poisoned(n);
            let call = bias_residual_call::<dyn EmuArg, dyn EmuArg>(
                dt.suffix(),
                &*dx,
                &*db,
                &*dr,
                &mut *y,
                n,
                cols,
            );
            // SAFETY: x, r and y hold n values, whole rows of cols; b holds cols.
            unsafe { emu::run(call) }.unwrap();
            let want = dt.round_all(&bias_residual_twin(&x, &b, &r).unwrap());
            assert_close(
                &format!("bias_residual {dt:?}"),
                &written("y", &*y),
                &want,
                dt.tol(),
            );

            let mut partial = Dt::F32.poisoned(column_sum_chunks(rows) * cols);
            let call = column_sum_partial_call::<dyn EmuArg, dyn EmuArg>(
                dt.suffix(),
                &*dx,
                &mut *partial,
                rows,
                cols,
            );
            // SAFETY: g (x) holds rows x cols values, partial chunks x cols.
            unsafe { emu::run(call) }.unwrap();
            written("partial", &*partial);
            let mut sums = dt.poisoned(cols);
            let call = column_sum_total_call::<dyn EmuArg, dyn EmuArg>(
                dt.suffix(),
                &*partial,
                &mut *sums,
                rows,
                cols,
            );
            // SAFETY: partial holds chunks x cols values, sums cols.
            unsafe { emu::run(call) }.unwrap();
            let want = dt.round_all(&column_sum_twin(&x, cols).unwrap());
            assert_close(
                &format!("column_sum {dt:?}"),
                &written("sums", &*sums),
                &want,
                dt.tol(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twins_compute_the_formulas() -> Result<()> {
        let x = [-3.0f32, -0.5, 0.0, 0.7, 2.5, 10.0];
        let b = [0.25f32, -0.25, 1.0];
        let y = bias_act_twin(&x, &b, Act::QuickGelu)?;
        for (i, v) in y.iter().enumerate() {
            let z = (x[i] + b[i % 3]) as f64;
            let want = z / (1.0 + (-1.702 * z).exp());
            assert!((*v as f64 - want).abs() < 1e-6, "{i}: {v} vs {want}");
        }
        let y = bias_act_twin(&x, &b, Act::Gelu)?;
        // gelu(1) = 0.8413447, gelu(-0.75) = -0.1699705
        assert!((y[2] - 0.841_344_7).abs() < 1e-6, "{}", y[2]);
        assert!((y[1] + 0.169_970_5).abs() < 1e-6, "{}", y[1]);
        assert_eq!(bias_act_twin(&x, &b, Act::Identity)?[0], -2.75);
        let r = [1.0f32; 6];
        assert_eq!(bias_residual_twin(&x, &b, &r)?[5], 12.0);
        assert!(bias_act_twin(&x[..5], &b, Act::Gelu).is_err());
        // The derivatives against central differences in f64 of the same formulas.
        for act in [Act::QuickGelu, Act::Gelu, Act::Identity] {
            let dy = [0.5f32, -2.0, 1.0, 3.0, -1.0, 0.25];
            let got = bias_act_backward_twin(&x, &b, &dy, act)?;
            for i in 0..x.len() {
                let z = x[i] as f64 + b[i % 3] as f64;
                let f = |v: f64| match act {
                    Act::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
                    Act::Gelu => Act::Gelu.apply(v as f32) as f64,
                    Act::Identity => v,
                };
                let h = if act == Act::Gelu { 1e-2 } else { 1e-5 };
                let want = dy[i] as f64 * (f(z + h) - f(z - h)) / (2.0 * h);
                let tol = if act == Act::Gelu { 2e-3 } else { 1e-5 };
                assert!(
                    (got[i] as f64 - want).abs() < tol * (1.0 + want.abs()),
                    "{act:?} {i}: {} vs {want}",
                    got[i]
                );
            }
        }
        assert!(bias_act_backward_twin(&x, &b, &r[..3], Act::Gelu).is_err());
        // Column sums over more rows than one chunk.
        let rows = 2 * COLSUM_ROWS + 5;
        let g: Vec<f32> = (0..rows * 3).map(|i| (i % 7) as f32 - 3.0).collect();
        let sums = column_sum_twin(&g, 3)?;
        for (c, s) in sums.iter().enumerate() {
            let want: f32 = (0..rows).map(|r| g[r * 3 + c]).sum();
            assert_eq!(*s, want, "column {c}");
        }
        assert!(column_sum_twin(&g[..7], 3).is_err());
        assert!(bias_residual_twin(&x, &b, &r[..3]).is_err());
        Ok(())
    }
}
