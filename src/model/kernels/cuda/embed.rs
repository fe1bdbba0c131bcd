//! The CPU twins and launchers of `embed.cu`: the text tower's token + position embedding and
//! its backward (rows summed per target, deterministic), the vision tower's patches unfolded
//! for its product, and its class token + positions over that product (alone for training,
//! with the pre-layer-norm for inference) and their backward.

use candle_core::{bail, Result};

use super::call::Call;

/// Warps per block of the row kernels: `NWARPS` in `embed.cu`.
const NWARPS: u32 = 4;
/// Threads per block of the column kernels: `COLS` in `embed.cu`.
const COLS: u32 = 128;

/// `n` as a kernel's `int`, or an error naming `what`.
fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what}: {n} is too many")))
}

/// The rows of a gathered embedding grouped by the table row they came from: the backward of a
/// gather sums each group, in this order, into its row. Built on the host from the ids (or
/// positions) the forward read; the kernel takes the three arrays as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowGroups {
    /// Group `k`'s rows are `rows[start[k]..start[k + 1]]`; `groups + 1` offsets.
    pub start: Vec<u32>,
    /// Every gathered row once, grouped by target, ascending within a group.
    pub rows: Vec<u32>,
    /// Each group's table row, ascending.
    pub target: Vec<u32>,
}

impl RowGroups {
    /// Groups rows `0..targets.len()` by `targets[row]`.
    pub fn by_target(targets: &[u32]) -> Result<Self> {
        int(targets.len(), "embedding backward rows")?;
        let mut rows: Vec<u32> = (0..targets.len() as u32).collect();
        // Stable: rows keep their order within a group.
        rows.sort_by_key(|&r| targets[r as usize]);
        let (mut start, mut target) = (Vec::new(), Vec::new());
        for (i, &r) in rows.iter().enumerate() {
            let t = targets[r as usize];
            if target.last() != Some(&t) {
                target.push(t);
                start.push(i as u32);
            }
        }
        start.push(rows.len() as u32);
        Ok(Self {
            start,
            rows,
            target,
        })
    }

    pub fn groups(&self) -> usize {
        self.target.len()
    }
}

/// The patches of `items` images (`[items, channels, size, size]`) as `items * (size / p)^2`
/// rows of `channels * p * p`, each in the convolution kernel's (channel, y, x) order:
/// `clipft_unfold_patches_*` (a copy, exact). The CPU training path's embedding runs it too
/// (in parallel over rows).
pub fn unfold_patches_twin(
    px: &[f32],
    items: usize,
    channels: usize,
    size: usize,
    p: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let g = size / p.max(1);
    let k = channels * p * p;
    let mut out = vec![0f32; items * g * g * k];
    out.par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let (item, gy, gx) = (r / (g * g), (r / g) % g, r % g);
            for ch in 0..channels {
                for py in 0..p {
                    let src = ((item * channels + ch) * size + gy * p + py) * size + gx * p;
                    row[(ch * p + py) * p..][..p].copy_from_slice(&px[src..src + p]);
                }
            }
        });
    out
}

/// Checks `len` pixel values are `items` images of `channels x size x size` that patches of `p`
/// tile; returns the unfolded values' count.
pub fn check_unfold(
    len: usize,
    items: usize,
    channels: usize,
    size: usize,
    p: usize,
) -> Result<usize> {
    if p == 0 || !size.is_multiple_of(p) || len != items * channels * size * size {
        bail!("unfold: {len} values are not {items} images of {channels}x{size}x{size} in patches of {p}");
    }
    int(len, "unfolded patch values")?;
    Ok(len)
}

/// `out[r] = table[ids[r]] + pos[positions[r]]` (rows of `d`), each value rounded by `round`
/// (to the kernel's element type), as `clipft_token_positions_*` computes it. Ids and
/// positions must lie within the tables.
pub fn token_positions_twin(
    table: &[f32],
    pos: &[f32],
    ids: &[u32],
    positions: &[u32],
    d: usize,
    round: fn(f32) -> f32,
) -> Result<Vec<f32>> {
    check_ids(ids, positions, table.len() / d.max(1), pos.len() / d.max(1))?;
    let mut out = Vec::with_capacity(ids.len() * d);
    for (&id, &p) in ids.iter().zip(positions) {
        let (e, q) = (&table[id as usize * d..][..d], &pos[p as usize * d..][..d]);
        out.extend(e.iter().zip(q).map(|(a, b)| round(a + b)));
    }
    Ok(out)
}

/// Checks that every id has a row in a table of `vocab` rows and every position in one of
/// `positions` rows, one position per id.
pub fn check_ids(ids: &[u32], positions: &[u32], vocab: usize, rows: usize) -> Result<()> {
    if ids.len() != positions.len() {
        bail!(
            "token embedding: {} positions for {} ids",
            positions.len(),
            ids.len()
        );
    }
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    if let Some(bad) = positions.iter().find(|&&p| p as usize >= rows) {
        bail!("token position {bad} but {rows} positions");
    }
    Ok(())
}

/// `out_rows` rows of `d`: each group of `g`'s rows summed in order into its target row, the
/// other rows zero, as `clipft_rows_sum_*` computes them (the caller rounds the result).
pub fn rows_sum_twin(g: &[f32], groups: &RowGroups, d: usize, out_rows: usize) -> Result<Vec<f32>> {
    check_groups(groups, g.len() / d.max(1), out_rows)?;
    let mut out = vec![0f32; out_rows * d];
    for (k, &t) in groups.target.iter().enumerate() {
        let o = &mut out[t as usize * d..][..d];
        for &r in &groups.rows[groups.start[k] as usize..groups.start[k + 1] as usize] {
            for (o, v) in o.iter_mut().zip(&g[r as usize * d..][..d]) {
                *o += v;
            }
        }
    }
    Ok(out)
}

/// Checks `groups` against `n` gradient rows and `out_rows` table rows: offsets ascending
/// within the rows, rows and targets in range.
fn check_groups(groups: &RowGroups, n: usize, out_rows: usize) -> Result<()> {
    let RowGroups {
        start,
        rows,
        target,
    } = groups;
    let ok = start.len() == target.len() + 1
        && start.windows(2).all(|w| w[0] <= w[1])
        && start.last().is_some_and(|&s| s as usize <= rows.len())
        && rows.iter().all(|&r| (r as usize) < n)
        && target.iter().all(|&t| (t as usize) < out_rows);
    if !ok {
        bail!("embedding backward: row groups that do not fit {n} rows and {out_rows} targets");
    }
    Ok(())
}

/// `items * t` rows of `d`: row `j` of each item is the class token `cls` (`j == 0`) or the
/// patch product's row `j - 1` of the item (`e`, `items * (t - 1)` rows), plus position `j`'s
/// row of `pos`, rounded by `round`: `clipft_class_positions_*`.
pub fn class_positions_twin(
    e: &[f32],
    cls: &[f32],
    pos: &[f32],
    t: usize,
    round: fn(f32) -> f32,
) -> Result<Vec<f32>> {
    let d = cls.len();
    let items = check_class_positions(e.len(), d, pos.len(), t)?;
    let mut x = Vec::with_capacity(items * t * d);
    for item in 0..items {
        for j in 0..t {
            let src = match j {
                0 => cls,
                _ => &e[(item * (t - 1) + j - 1) * d..][..d],
            };
            x.extend(
                src.iter()
                    .zip(&pos[j * d..][..d])
                    .map(|(a, b)| round(a + b)),
            );
        }
    }
    Ok(x)
}

/// Items of `e_len` patch-product values for `t` rows of `d` (`pos_len == t * d`).
fn check_class_positions(e_len: usize, d: usize, pos_len: usize, t: usize) -> Result<usize> {
    let per_item = t.saturating_sub(1) * d;
    if t == 0 || d == 0 || pos_len != t * d || (per_item > 0 && !e_len.is_multiple_of(per_item)) {
        bail!("class and positions: {e_len} patch values, {pos_len} position values for {t} rows of {d}");
    }
    let items = e_len.checked_div(per_item).unwrap_or(0);
    int(items * t * d, "class and positions values")?;
    Ok(items)
}

/// The gradient of [`class_positions_twin`]'s output `dx` (`items * t` rows of `d`): `items *
/// (t - 1) + t + 1` rows, the patch product's gradient (`dx`'s rows but each item's first),
/// then each position's summed over the items in order, then the class token's (position
/// 0's sum): `clipft_class_positions_backward_*` (the caller rounds the sums).
pub fn class_positions_backward_twin(dx: &[f32], t: usize, d: usize) -> Result<Vec<f32>> {
    if t == 0 || d == 0 || !dx.len().is_multiple_of(t * d) {
        bail!(
            "class and positions backward: {} values in rows of {t} x {d}",
            dx.len()
        );
    }
    let items = dx.len() / (t * d);
    let mut out = Vec::with_capacity((items * (t - 1) + t + 1) * d);
    for item in dx.chunks(t * d) {
        out.extend_from_slice(&item[d..]);
    }
    let mut sums = vec![0f32; t * d];
    for item in dx.chunks(t * d) {
        for (s, v) in sums.iter_mut().zip(item) {
            *s += v;
        }
    }
    out.extend_from_slice(&sums);
    out.extend_from_slice(&sums[..d]);
    Ok(out)
}

/// `clipft_token_positions_<suffix>`: `n` rows of `d` from the `(id, position)` pairs `at`.
#[allow(clippy::too_many_arguments)]
pub fn token_positions_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    [table, pos, at]: [&'a I; 3],
    out: &'a mut O,
    n: usize,
    d: usize,
    vocab: usize,
    positions: usize,
) -> Call<'a, I, O> {
    let grid = ((n as u32).div_ceil(NWARPS), 1, 1);
    Call::new(
        format!("clipft_token_positions_{suffix}"),
        grid,
        NWARPS * 32,
    )
    .input(table)
    .input(pos)
    .input(at)
    .output(out)
    .i32(n as i32)
    .i32(d as i32)
    .i32(vocab as i32)
    .i32(positions as i32)
}

/// `clipft_unfold_patches_<suffix>`: every one of the `items` images' values into `out`.
pub fn unfold_patches_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    px: &'a I,
    out: &'a mut O,
    [items, channels, size, p]: [usize; 4],
) -> Call<'a, I, O> {
    let total = items * channels * size * size;
    let grid = ((total as u32).div_ceil(256), 1, 1);
    Call::new(format!("clipft_unfold_patches_{suffix}"), grid, 256)
        .input(px)
        .output(out)
        .i32(items as i32)
        .i32(channels as i32)
        .i32(size as i32)
        .i32(p as i32)
}

/// `clipft_rows_sum_<suffix>`: `groups` groups of the `n` rows of `g` summed into their target
/// rows of `out` (`out_rows` rows of `d`).
#[allow(clippy::too_many_arguments)]
pub fn rows_sum_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    [g, start, rows, target]: [&'a I; 4],
    out: &'a mut O,
    groups: usize,
    n: usize,
    d: usize,
    out_rows: usize,
) -> Call<'a, I, O> {
    let grid = (groups as u32, (d as u32).div_ceil(COLS), 1);
    Call::new(format!("clipft_rows_sum_{suffix}"), grid, COLS)
        .input(g)
        .input(start)
        .input(rows)
        .input(target)
        .output(out)
        .i32(groups as i32)
        .i32(n as i32)
        .i32(d as i32)
        .i32(out_rows as i32)
}

/// `clipft_class_positions_<suffix>`: the `rows = items * t` rows of `x`.
pub fn class_positions_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    [e, cls, pos]: [&'a I; 3],
    x: &'a mut O,
    rows: usize,
    t: usize,
    d: usize,
) -> Call<'a, I, O> {
    let grid = ((rows as u32).div_ceil(NWARPS), 1, 1);
    Call::new(
        format!("clipft_class_positions_{suffix}"),
        grid,
        NWARPS * 32,
    )
    .input(e)
    .input(cls)
    .input(pos)
    .output(x)
    .i32(rows as i32)
    .i32(t as i32)
    .i32(d as i32)
}

/// `clipft_class_positions_norm_<suffix>`: the layer norm (weight `w`, bias `lb`) of the
/// `rows` rows of [`class_positions_call`]'s `x`, into `y`.
#[allow(clippy::too_many_arguments)]
pub fn class_positions_norm_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    [e, cls, pos, w, lb]: [&'a I; 5],
    y: &'a mut O,
    rows: usize,
    t: usize,
    d: usize,
    eps: f32,
) -> Call<'a, I, O> {
    let grid = ((rows as u32).div_ceil(NWARPS), 1, 1);
    Call::new(
        format!("clipft_class_positions_norm_{suffix}"),
        grid,
        NWARPS * 32,
    )
    .input(e)
    .input(cls)
    .input(pos)
    .input(w)
    .input(lb)
    .output(y)
    .i32(rows as i32)
    .i32(t as i32)
    .i32(d as i32)
    .f32(eps)
}

/// `clipft_class_positions_backward_<suffix>`: from `dx` (`items * t` rows of `d`), the patch
/// product's gradient, the positions' and the class token's.
pub fn class_positions_backward_call<'a, I: ?Sized, O: ?Sized>(
    suffix: &str,
    dx: &'a I,
    [dpatch, dpos, dcls]: [&'a mut O; 3],
    items: usize,
    t: usize,
    d: usize,
) -> Call<'a, I, O> {
    let grid = (t as u32, (d as u32).div_ceil(COLS), 1);
    Call::new(
        format!("clipft_class_positions_backward_{suffix}"),
        grid,
        COLS,
    )
    .input(dx)
    .output(dpatch)
    .output(dpos)
    .output(dcls)
    .i32(items as i32)
    .i32(t as i32)
    .i32(d as i32)
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
    use candle_core::{CudaDevice, Result};

    use super::super::call::{self, CudaIn, CudaOut};
    use super::RowGroups;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/embed.ptx"));
    const MODULE: &str = "clipft_embed";

    /// `clipft_token_positions_<suffix>`: rows `table[ids[r]] + pos[positions[r]]`, the ids
    /// and positions checked against the tables (rows of `d`) here, on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn token_positions<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        table: &CudaView<'_, T>,
        pos: &CudaView<'_, T>,
        ids: &[u32],
        positions: &[u32],
        d: usize,
    ) -> Result<CudaSlice<T>> {
        let (vocab, rows) = (table.len() / d.max(1), pos.len() / d.max(1));
        super::check_ids(ids, positions, vocab, rows)?;
        let n = ids.len();
        super::int(n * d, "token embedding values")?;
        super::int(vocab, "token embedding rows")?;
        let at: Vec<u32> = ids
            .iter()
            .zip(positions)
            .flat_map(|(&i, &p)| [i, p])
            .collect();
        let at = dev.clone_htod(&at)?;
        // SAFETY: the kernel writes every row (one warp each).
        let mut out = unsafe { dev.alloc::<T>(n * d)? };
        if n == 0 || d == 0 {
            return Ok(out);
        }
        let call = super::token_positions_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix,
            [table, pos, &at],
            &mut out,
            n,
            d,
            vocab,
            rows,
        );
        // SAFETY: every id is below `vocab` and every position below `rows` (checked above;
        // the kernel also skips any that are not), so the reads lie within `table` and `pos`;
        // `at` holds 2 n values and `out` n rows of d.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(out)
    }

    /// `clipft_unfold_patches_<suffix>`: the patches of `items` images of `channels x size x
    /// size` (`px`) as rows, [`super::unfold_patches_twin`]'s layout.
    pub fn unfold_patches<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        px: &CudaView<'_, T>,
        dims: [usize; 4],
    ) -> Result<CudaSlice<T>> {
        let [items, channels, size, p] = dims;
        let n = super::check_unfold(px.len(), items, channels, size, p)?;
        // SAFETY: the kernel writes every value (one thread each).
        let mut out = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(out);
        }
        let call = super::unfold_patches_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix, px, &mut out, dims,
        );
        // SAFETY: px holds items x channels x size x size values and out as many (checked, and
        // p tiles size), so every source and destination index lies within them.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(out)
    }

    /// `clipft_rows_sum_<suffix>`: `out_rows` rows of `d`, each group of `g`'s rows summed
    /// into its target, the others zero.
    pub fn rows_sum<T: DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits>(
        suffix: &str,
        dev: &CudaDevice,
        g: &CudaView<'_, T>,
        groups: &RowGroups,
        d: usize,
        out_rows: usize,
    ) -> Result<CudaSlice<T>> {
        let n = g.len() / d.max(1);
        if n * d != g.len() {
            candle_core::bail!("embedding backward: {} values in rows of {d}", g.len());
        }
        super::check_groups(groups, n, out_rows)?;
        super::int(out_rows * d, "embedding backward values")?;
        let mut out = dev.alloc_zeros::<T>(out_rows * d)?;
        if groups.groups() == 0 || d == 0 {
            return Ok(out);
        }
        let start = dev.clone_htod(&groups.start)?;
        let rows = dev.clone_htod(&groups.rows)?;
        let target = dev.clone_htod(&groups.target)?;
        let call = super::rows_sum_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix,
            [g, &start, &rows, &target],
            &mut out,
            groups.groups(),
            n,
            d,
            out_rows,
        );
        // SAFETY: the groups were checked above: offsets ascending within `rows`, every row
        // below n (g holds n rows of d) and every target below out_rows (out holds out_rows
        // rows of d); start holds groups + 1 values.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(out)
    }

    /// `clipft_class_positions_<suffix>` (`norm` None, training) or
    /// `clipft_class_positions_norm_<suffix>` (`norm` the weight and bias, inference): `items
    /// * t` rows of `d = cls.len()`.
    pub fn class_positions<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        [e, cls, pos]: [&CudaView<'_, T>; 3],
        norm: Option<(&CudaView<'_, T>, &CudaView<'_, T>, f32)>,
        t: usize,
    ) -> Result<CudaSlice<T>> {
        let d = cls.len();
        let items = super::check_class_positions(e.len(), d, pos.len(), t)?;
        let rows = items * t;
        // SAFETY: either kernel writes every row (one warp each).
        let mut out = unsafe { dev.alloc::<T>(rows * d)? };
        if rows == 0 {
            return Ok(out);
        }
        match norm {
            None => {
                let call = super::class_positions_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
                    suffix,
                    [e, cls, pos],
                    &mut out,
                    rows,
                    t,
                    d,
                );
                // SAFETY: e holds items (t - 1) rows of d, pos t rows, cls d values (checked);
                // out holds items t rows.
                unsafe { call::run(dev, MODULE, PTX, call) }?;
            }
            Some((w, lb, eps)) => {
                if w.len() != d || lb.len() != d {
                    candle_core::bail!(
                        "class and positions: a norm of {} and {} for rows of {d}",
                        w.len(),
                        lb.len()
                    );
                }
                let call = super::class_positions_norm_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
                    suffix,
                    [e, cls, pos, w, lb],
                    &mut out,
                    rows,
                    t,
                    d,
                    eps,
                );
                // SAFETY: as above, and w and lb hold d values (checked).
                unsafe { call::run(dev, MODULE, PTX, call) }?;
            }
        }
        Ok(out)
    }

    /// `clipft_class_positions_backward_<suffix>`: `items * (t - 1) + t + 1` rows of `d`, as
    /// [`super::class_positions_backward_twin`] lays them out.
    pub fn class_positions_backward<T: DeviceRepr>(
        suffix: &str,
        dev: &CudaDevice,
        dx: &CudaView<'_, T>,
        t: usize,
        d: usize,
    ) -> Result<CudaSlice<T>> {
        if t == 0 || d == 0 || !dx.len().is_multiple_of(t * d) {
            candle_core::bail!(
                "class and positions backward: {} values in rows of {t} x {d}",
                dx.len()
            );
        }
        let items = dx.len() / (t * d);
        let patch = items * (t - 1) * d;
        super::int(patch + (t + 1) * d, "class and positions backward values")?;
        // SAFETY: the kernel writes every value of all three parts: thread (j, c) writes
        // column c of position j's sum, of each item's patch row j - 1 (j > 0) and, for
        // j == 0, of the class token's row.
        let mut out = unsafe { dev.alloc::<T>(patch + (t + 1) * d)? };
        let Some((mut dpatch, mut rest)) = out.try_split_at_mut(patch) else {
            candle_core::bail!("class and positions backward: an output too short");
        };
        let Some((mut dpos, mut dcls)) = rest.try_split_at_mut(t * d) else {
            candle_core::bail!("class and positions backward: an output too short");
        };
        let call = super::class_positions_backward_call::<dyn CudaIn + '_, dyn CudaOut + '_>(
            suffix,
            dx,
            [&mut dpatch, &mut dpos, &mut dcls],
            items,
            t,
            d,
        );
        // SAFETY: dx holds items t rows of d (checked); dpatch items (t - 1) rows, dpos t
        // rows and dcls one, the three parts of `out`.
        unsafe { call::run(dev, MODULE, PTX, call) }?;
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{
    class_positions, class_positions_backward, rows_sum, token_positions, unfold_patches,
};

/// `embed.cu` itself, run by the CPU emulator with the launchers' grids and arguments, in each
/// type, against the twins.
#[cfg(test)]
mod emu_tests {
    use super::super::call::emu::{self, assert_close, values, written, Dt, EmuArg};
    use super::*;
    use clipft_cuda_emu as e;

    fn rounding(dt: Dt) -> fn(f32) -> f32 {
        match dt {
            Dt::F32 => |v| v,
            Dt::F16 => |v| Dt::F16.round(v),
            Dt::Bf16 => |v| Dt::Bf16.round(v),
        }
    }

    fn u32s(v: &[u32]) -> e::Buffer<u32> {
        e::Buffer::from_slice(v)
    }

    #[test]
    fn emulated_token_positions_and_rows_sum_match_their_twins() {
        // Rows narrower than a warp and wider than the column block; repeated ids, so the
        // backward's groups have several rows.
        for (vocab, rows, d) in [(11, 5, 20), (9, 7, 300)] {
            let ids: Vec<u32> = (0..13).map(|i| (i * 7 % vocab) as u32).collect();
            let positions: Vec<u32> = (0..13).map(|i| (i % rows) as u32).collect();
            let n = ids.len();
            for dt in Dt::ALL {
                let what = format!("{dt:?} {vocab}x{d}");
                let table = dt.round_all(&values(vocab * d, 1));
                let pos = dt.round_all(&values(rows * d, 2));
                let at: Vec<u32> = ids
                    .iter()
                    .zip(&positions)
                    .flat_map(|(&i, &p)| [i, p])
                    .collect();
                let (bt, bp, ba) = (dt.buffer(&table), dt.buffer(&pos), u32s(&at));
                let mut out = dt.poisoned(n * d);
                let call = token_positions_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    [&*bt, &*bp, &ba],
                    &mut *out,
                    n,
                    d,
                    vocab,
                    rows,
                );
                // SAFETY: the ids and positions lie within the tables; out holds n rows.
                unsafe { emu::run(call) }.unwrap();
                let want =
                    token_positions_twin(&table, &pos, &ids, &positions, d, rounding(dt)).unwrap();
                assert_close(&format!("embed {what}"), &written("out", &*out), &want, 0.0);

                let g = dt.round_all(&values(n * d, 3));
                let bg = dt.buffer(&g);
                for (targets, out_rows) in [(&ids, vocab), (&positions, rows)] {
                    let groups = RowGroups::by_target(targets).unwrap();
                    let (s, r, t) = (
                        u32s(&groups.start),
                        u32s(&groups.rows),
                        u32s(&groups.target),
                    );
                    // The launcher zero-fills the output; the kernel writes the targets.
                    let mut out = dt.buffer(&vec![0.0; out_rows * d]);
                    let call = rows_sum_call::<dyn EmuArg, dyn EmuArg>(
                        dt.suffix(),
                        [&*bg, &s, &r, &t],
                        &mut *out,
                        groups.groups(),
                        n,
                        d,
                        out_rows,
                    );
                    // SAFETY: the groups fit g's n rows and out's out_rows rows.
                    unsafe { emu::run(call) }.unwrap();
                    let want = dt.round_all(&rows_sum_twin(&g, &groups, d, out_rows).unwrap());
                    assert_close(&format!("sum {what}"), &written("out", &*out), &want, 0.0);
                }
            }
        }
    }

    #[test]
    fn emulated_unfold_matches_its_twin() {
        // Two images of 3 channels, 8 x 8 in patches of 4, and one in patches of 2.
        for (items, size, p) in [(2, 8, 4), (1, 6, 2)] {
            let n = items * 3 * size * size;
            for dt in Dt::ALL {
                let px = dt.round_all(&values(n, 7));
                let input = dt.buffer(&px);
                let mut out = dt.poisoned(n);
                let call = unfold_patches_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    &*input,
                    &mut *out,
                    [items, 3, size, p],
                );
                // SAFETY: both buffers hold n values.
                unsafe { emu::run(call) }.unwrap();
                let want = unfold_patches_twin(&px, items, 3, size, p);
                assert_close(
                    &format!("unfold {dt:?}"),
                    &written("out", &*out),
                    &want,
                    0.0,
                );
            }
        }
    }

    #[test]
    fn emulated_class_positions_match_their_twins() {
        // Three items of 5 positions (one a class token), rows narrower than a warp and wider
        // than the column block.
        for d in [20, 300] {
            let (items, t) = (3, 5);
            let rows = items * t;
            for dt in Dt::ALL {
                let what = format!("{dt:?} d {d}");
                let ev = dt.round_all(&values(items * (t - 1) * d, 1));
                let cls = dt.round_all(&values(d, 2));
                let pos = dt.round_all(&values(t * d, 3));
                let (w, lb) = (dt.round_all(&values(d, 4)), dt.round_all(&values(d, 5)));
                let ins = [&ev, &cls, &pos, &w, &lb].map(|v| dt.buffer(v));
                let want_x = class_positions_twin(&ev, &cls, &pos, t, rounding(dt)).unwrap();

                let mut x = dt.poisoned(rows * d);
                let call = class_positions_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    [&*ins[0], &*ins[1], &*ins[2]],
                    &mut *x,
                    rows,
                    t,
                    d,
                );
                // SAFETY: e holds items (t - 1) rows, pos t rows, cls and x as sized.
                unsafe { emu::run(call) }.unwrap();
                assert_close(&format!("x {what}"), &written("x", &*x), &want_x, 0.0);

                let mut y = dt.poisoned(rows * d);
                let call = class_positions_norm_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    [&*ins[0], &*ins[1], &*ins[2], &*ins[3], &*ins[4]],
                    &mut *y,
                    rows,
                    t,
                    d,
                    1e-5,
                );
                // SAFETY: as above; w and lb hold d values.
                unsafe { emu::run(call) }.unwrap();
                let want_y =
                    super::super::layernorm::layer_norm_twin(&want_x, &w, &lb, 1e-5).unwrap();
                let want_y = dt.round_all(&want_y);
                assert_close(&format!("y {what}"), &written("y", &*y), &want_y, dt.tol());

                let dx = dt.round_all(&values(rows * d, 6));
                let bdx = dt.buffer(&dx);
                let (mut dpatch, mut dpos, mut dcls) = (
                    dt.poisoned(items * (t - 1) * d),
                    dt.poisoned(t * d),
                    dt.poisoned(d),
                );
                let call = class_positions_backward_call::<dyn EmuArg, dyn EmuArg>(
                    dt.suffix(),
                    &*bdx,
                    [&mut *dpatch, &mut *dpos, &mut *dcls],
                    items,
                    t,
                    d,
                );
                // SAFETY: dx holds items t rows; the outputs as sized.
                unsafe { emu::run(call) }.unwrap();
                let want = dt.round_all(&class_positions_backward_twin(&dx, t, d).unwrap());
                let got: Vec<f32> = [
                    written("dpatch", &*dpatch),
                    written("dpos", &*dpos),
                    written("dcls", &*dcls),
                ]
                .concat();
                assert_close(&format!("backward {what}"), &got, &want, 0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_groups_keep_each_targets_rows_in_order() {
        let g = RowGroups::by_target(&[3, 1, 3, 0, 1, 3]).unwrap();
        assert_eq!(g.target, [0, 1, 3]);
        assert_eq!(g.start, [0, 1, 3, 6]);
        assert_eq!(g.rows, [3, 1, 4, 0, 2, 5]);
        let sums = rows_sum_twin(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0], &g, 1, 5).unwrap();
        assert_eq!(sums, [8.0, 18.0, 0.0, 37.0, 0.0]);
        // Targets past the table, rows past the gradient.
        assert!(rows_sum_twin(&[1.0; 6], &g, 1, 3).is_err());
        assert!(rows_sum_twin(&[1.0; 5], &g, 1, 5).is_err());
        let empty = RowGroups::by_target(&[]).unwrap();
        assert_eq!(empty.start, [0]);
        assert_eq!(rows_sum_twin(&[], &empty, 4, 2).unwrap(), [0.0; 8]);
    }

    #[test]
    fn twins_check_their_inputs() {
        let table = [0.0; 8];
        assert!(token_positions_twin(&table, &[0.0; 4], &[4], &[0], 2, |v| v).is_err());
        assert!(token_positions_twin(&table, &[0.0; 4], &[3], &[2], 2, |v| v).is_err());
        assert!(token_positions_twin(&table, &[0.0; 4], &[3, 1], &[1], 2, |v| v).is_err());
        let x = token_positions_twin(
            &[1.0, 2.0, 3.0, 4.0],
            &[10.0, 20.0],
            &[1, 0],
            &[0, 0],
            2,
            |v| v,
        )
        .unwrap();
        assert_eq!(x, [13.0, 24.0, 11.0, 22.0]);
        // Two items of a class token and one patch, rows of 2.
        let x = class_positions_twin(
            &[1.0, 2.0, 3.0, 4.0],
            &[5.0, 6.0],
            &[0.5, 0.5, 1.0, 1.0],
            2,
            |v| v,
        )
        .unwrap();
        assert_eq!(x, [5.5, 6.5, 2.0, 3.0, 5.5, 6.5, 4.0, 5.0]);
        assert!(class_positions_twin(&[1.0; 3], &[5.0, 6.0], &[0.0; 4], 2, |v| v).is_err());
        let g =
            class_positions_backward_twin(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 2, 2).unwrap();
        // Patch rows, the two positions' sums over items, the class token's.
        assert_eq!(g, [3.0, 4.0, 7.0, 8.0, 6.0, 8.0, 10.0, 12.0, 6.0, 8.0]);
    }
}
