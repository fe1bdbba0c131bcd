//! The CPU twins and launchers of `elementwise.cu`: a linear layer's tail (bias + activation,
//! its backward, bias + residual) in one pass over its output.

use candle_core::{bail, Result};

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

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, Result};

    use super::Act;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));

    fn config(n: usize) -> LaunchConfig {
        // A grid-stride loop: enough blocks to fill an H100 several times over.
        let blocks = n.div_ceil(256).clamp(1, 132 * 32) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `clipft_bias_act_<suffix>` over `x` (whole rows of `b.len()`).
    pub fn bias_act<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        x: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        act: Act,
    ) -> Result<CudaSlice<T>> {
        super::check(x.len(), b.len(), b.len())?;
        let name = format!("clipft_bias_act_{suffix}");
        let func = dev.get_or_load_custom_func(&name, "clipft_elementwise", PTX)?;
        // SAFETY: the kernel writes every one of the x.len() values.
        let y = unsafe { dev.alloc::<T>(x.len())? };
        let (n, cols, act) = (x.len() as i64, b.len() as i32, act as i32);
        let mut l = func.builder();
        l.arg(x);
        l.arg(b);
        l.arg(&y);
        l.arg(&n);
        l.arg(&cols);
        l.arg(&act);
        if n > 0 {
            // SAFETY: reads x[0..n] and b[0..cols] (x holds whole rows of cols, checked), writes
            // y[0..n]; the arguments match `clipft_bias_act_*` in order and type.
            unsafe { l.launch(config(x.len())) }.w()?;
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
        let name = format!("clipft_bias_act_backward_{suffix}");
        let func = dev.get_or_load_custom_func(&name, "clipft_elementwise", PTX)?;
        // SAFETY: the kernel writes every one of the x.len() values.
        let dz = unsafe { dev.alloc::<T>(x.len())? };
        let (n, cols, act) = (x.len() as i64, b.len() as i32, act as i32);
        let mut l = func.builder();
        l.arg(x);
        l.arg(b);
        l.arg(dy);
        l.arg(&dz);
        l.arg(&n);
        l.arg(&cols);
        l.arg(&act);
        if n > 0 {
            // SAFETY: reads x[0..n], dy[0..n] (same length, checked) and b[0..cols] (x holds
            // whole rows of cols), writes dz[0..n]; the arguments match
            // `clipft_bias_act_backward_*` in order and type.
            unsafe { l.launch(config(x.len())) }.w()?;
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
        let load = |name: &str| {
            dev.get_or_load_custom_func(&format!("{name}_{suffix}"), "clipft_elementwise", PTX)
        };
        let (part, total) = (
            load("clipft_column_sum_partial")?,
            load("clipft_column_sum_total")?,
        );
        let chunks = rows.div_ceil(super::COLSUM_ROWS).max(1);
        // SAFETY: the first kernel writes a partial for every (chunk, column) (zero for a
        // chunk without rows) before the second, on the same stream, reads them; the second
        // writes every column of `out`.
        let (partial, out) = unsafe { (dev.alloc::<f32>(chunks * cols)?, dev.alloc::<T>(cols)?) };
        let tiles = (cols as u32).div_ceil(256);
        let (r, c, k) = (rows as i64, cols as i32, chunks as i32);
        let mut l = part.builder();
        l.arg(g);
        l.arg(&partial);
        l.arg(&r);
        l.arg(&c);
        let cfg = LaunchConfig {
            grid_dim: (tiles, chunks as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads rows x cols of g (whole rows, checked), writes chunks x cols of
        // `partial`; arguments in the kernel's order and types; chunks <= 65535 (checked).
        unsafe { l.launch(cfg) }.w()?;
        let mut l = total.builder();
        l.arg(&partial);
        l.arg(&out);
        l.arg(&k);
        l.arg(&c);
        let cfg = LaunchConfig {
            grid_dim: (tiles, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads chunks x cols of `partial`, writes cols of `out`; arguments in the
        // kernel's order and types.
        unsafe { l.launch(cfg) }.w()?;
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
        let name = format!("clipft_bias_residual_{suffix}");
        let func = dev.get_or_load_custom_func(&name, "clipft_elementwise", PTX)?;
        // SAFETY: the kernel writes every one of the x.len() values.
        let y = unsafe { dev.alloc::<T>(x.len())? };
        let (n, cols) = (x.len() as i64, b.len() as i32);
        let mut l = func.builder();
        l.arg(x);
        l.arg(b);
        l.arg(r);
        l.arg(&y);
        l.arg(&n);
        l.arg(&cols);
        if n > 0 {
            // SAFETY: reads x[0..n], r[0..n] (same length, checked) and b[0..cols], writes
            // y[0..n]; the arguments match `clipft_bias_residual_*` in order and type.
            unsafe { l.launch(config(x.len())) }.w()?;
        }
        Ok(y)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{bias_act, bias_act_backward, bias_residual, column_sum};

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
