//! The towers' embeddings on the GPU path as single ops, each with a backward that is itself
//! an op (`kernels/cuda/embed.cu` on a GPU, the kernels' twins on the CPU).
//!
//! Composed from candle's ops, the text embedding is two gathers and an add, and the vision
//! embedding after its patch product a concatenation with the class token, a broadcast add of
//! the positions and the pre-layer-norm: four or five launches forward, and in backward a
//! zero-filled buffer per edge, a reduction over the batch and copies for the concatenation.
//! Here `TokenPositions` is one launch (its backward one per table, summing each table row's
//! gathered rows in a fixed order), and `ClassPositions` one launch in inference (with the
//! pre-layer-norm) and in training (without it: the norm stays
//! [`super::fused_norm::FusedLayerNorm`], whose backward the op's own follows with one
//! launch for the patches', positions' and class token's gradients).
//!
//! Weights that do not take part in the graph (frozen) get no gradient computed; those that
//! are variables inside a [`super::train_ops::with_direct_weight_grads`] pass hand theirs to it
//! directly, as the block nodes do.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::gpu_block::Norm;
use super::train_ops::divert_grad;
use crate::model::kernels::cuda::embed::{
    check_unfold, class_positions_backward_twin, class_positions_twin, rows_sum_twin,
    token_positions_twin, unfold_patches_twin, RowGroups,
};
use crate::model::kernels::cuda::layernorm::layer_norm_twin;

/// `table[ids[r]] + positions[pos[r]]` for each row `r`: applied as `table.apply_op2(pos)`
/// (`[vocab, d]` and `[max_positions, d]`), result `[rows, d]`. The ids and positions are on
/// the host (the tokenizer made them), checked against the tables there and uploaded with the
/// launch; the backward groups the rows by table row on the host too.
#[derive(Debug, Clone)]
pub(crate) struct TokenPositions {
    pub ids: Arc<[u32]>,
    pub positions: Arc<[u32]>,
}

impl TokenPositions {
    fn dims(tl: &Layout, pl: &Layout) -> Result<usize> {
        let (_, d) = tl.shape().dims2()?;
        let (_, d2) = pl.shape().dims2()?;
        if d != d2 || !tl.is_contiguous() || !pl.is_contiguous() {
            candle_core::bail!(
                "token embedding: contiguous tables of the same width, not {:?} and {:?}",
                tl.shape(),
                pl.shape()
            );
        }
        Ok(d)
    }
}

impl CustomOp2 for TokenPositions {
    fn name(&self) -> &'static str {
        "clipft-token-positions"
    }

    fn cpu_fwd(
        &self,
        ts: &CpuStorage,
        tl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Self::dims(tl, pl)?;
        let out = token_positions_twin(
            &super::twin_input(ts, tl, self.name())?,
            &super::twin_input(ps, pl, self.name())?,
            &self.ids,
            &self.positions,
            d,
            super::twin_rounding(ts),
        )?;
        Ok((
            super::twin_output(ts, out),
            Shape::from((self.ids.len(), d)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::embed;
        let d = Self::dims(tl, pl)?;
        let dev = ts.device.clone();
        let out = by_dtype!(ts, self.name(), |T, suffix| {
            let (table, pos) = (
                super::cuda_view::<T>(ts, tl)?,
                super::cuda_view::<T>(ps, pl)?,
            );
            let out = embed::token_positions::<T>(
                suffix,
                &dev,
                &table,
                &pos,
                &self.ids,
                &self.positions,
                d,
            )?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from((self.ids.len(), d))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        pos: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let mut out = [None, None];
        for (slot, (w, at)) in out
            .iter_mut()
            .zip([(table, &self.ids), (pos, &self.positions)])
        {
            if !w.track_op() {
                continue;
            }
            let op = RowsSum {
                groups: RowGroups::by_target(at)?,
                out_rows: w.dim(0)?,
            };
            *slot = divert_grad(w, g.apply_op1_no_bwd(&op)?);
        }
        let [dt, dp] = out;
        Ok((dt, dp))
    }
}

/// The backward of a gather: `[out_rows, d]` from the gathered rows' gradient `[rows, d]`,
/// each group's rows summed in order into its target row, the other rows zero (dense, as
/// torch's `nn.Embedding` hands AdamW its gradient).
struct RowsSum {
    groups: RowGroups,
    out_rows: usize,
}

impl CustomOp1 for RowsSum {
    fn name(&self) -> &'static str {
        "clipft-rows-sum"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, d) = gl.shape().dims2()?;
        let out = rows_sum_twin(
            &super::twin_input(gs, gl, self.name())?,
            &self.groups,
            d,
            self.out_rows,
        )?;
        Ok((super::twin_output(gs, out), Shape::from((self.out_rows, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::embed;
        let (_, d) = gl.shape().dims2()?;
        if !gl.is_contiguous() {
            candle_core::bail!("{}: a contiguous gradient only", self.name());
        }
        let dev = gs.device.clone();
        let out = by_dtype!(gs, self.name(), |T, suffix| {
            let g = super::cuda_view::<T>(gs, gl)?;
            let out = embed::rows_sum::<T>(suffix, &dev, &g, &self.groups, d, self.out_rows)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from((self.out_rows, d))))
    }
}

/// Images `[items, channels, size, size]` as rows of patches `[items * (size / patch)^2,
/// channels * patch^2]`, each in the patch convolution's kernel order, for the patch product:
/// one launch (candle's strided copy of the 6-d permuted view is one too, after uploading its
/// dims and strides). Pixels take no gradient, so no backward: apply it with
/// `apply_op1_no_bwd`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnfoldPatches {
    pub patch: usize,
}

impl UnfoldPatches {
    /// `[items, channels, size, patch]`, checking the images' shape and that patches tile it.
    fn dims(&self, l: &Layout) -> Result<[usize; 4]> {
        let (items, channels, h, w) = l.shape().dims4()?;
        if h != w || !l.is_contiguous() {
            candle_core::bail!("unfold: contiguous square images only, not {:?}", l.shape());
        }
        check_unfold(l.shape().elem_count(), items, channels, h, self.patch)?;
        Ok([items, channels, h, self.patch])
    }

    fn out_shape([items, channels, size, p]: [usize; 4]) -> Shape {
        let g = size / p;
        Shape::from((items * g * g, channels * p * p))
    }
}

impl CustomOp1 for UnfoldPatches {
    fn name(&self) -> &'static str {
        "clipft-unfold-patches"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims @ [items, channels, size, p] = self.dims(l)?;
        let px = super::twin_input(s, l, self.name())?;
        let out = unfold_patches_twin(&px, items, channels, size, p);
        Ok((super::twin_output(s, out), Self::out_shape(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::embed;
        let dims = self.dims(l)?;
        let dev = s.device.clone();
        let out = by_dtype!(s, self.name(), |T, suffix| {
            let px = super::cuda_view::<T>(s, l)?;
            let out = embed::unfold_patches::<T>(suffix, &dev, &px, dims)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Self::out_shape(dims)))
    }
}

/// The vision embedding after the patch product: each item's rows are the class token, then
/// its patches' rows, each plus its position's row. Applied as `e.apply_op3(cls, positions)`
/// with `e` the patch product `[items, t - 1, d]`, `cls` `[d]` and `positions` `[t, d]`;
/// result `[items, t, d]`. With `norm` (inference) the result is the pre-layer-norm of those
/// rows, in the same pass, and the op has no backward.
#[derive(Debug, Clone)]
pub(crate) struct ClassPositions {
    pub norm: Option<Norm>,
}

impl ClassPositions {
    /// Items, positions and width, checking the shapes and that everything is contiguous.
    fn dims(el: &Layout, cl: &Layout, pl: &Layout) -> Result<(usize, usize, usize)> {
        let (t, d) = pl.shape().dims2()?;
        let items = match el.shape().dims3() {
            Ok((items, patches, d2)) if patches + 1 == t && d2 == d => items,
            _ => candle_core::bail!(
                "class and positions: patches {:?} for positions {:?}",
                el.shape(),
                pl.shape()
            ),
        };
        if cl.shape().dims() != [d] || [el, cl, pl].iter().any(|l| !l.is_contiguous()) {
            candle_core::bail!(
                "class and positions: a contiguous class token of {d}, not {:?}",
                cl.shape()
            );
        }
        Ok((items, t, d))
    }
}

impl CustomOp3 for ClassPositions {
    fn name(&self) -> &'static str {
        "clipft-class-positions"
    }

    fn cpu_fwd(
        &self,
        es: &CpuStorage,
        el: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (items, t, d) = Self::dims(el, cl, pl)?;
        let x = class_positions_twin(
            &super::twin_input(es, el, self.name())?,
            &super::twin_input(cs, cl, self.name())?,
            &super::twin_input(ps, pl, self.name())?,
            t,
            super::twin_rounding(es),
        )?;
        let out = match &self.norm {
            Some(n) => {
                let (w, b) = (
                    super::twin_tensor(&n.weight, self.name())?,
                    super::twin_tensor(&n.bias, self.name())?,
                );
                layer_norm_twin(&x, &w, &b, n.eps)?
            }
            None => x,
        };
        Ok((super::twin_output(es, out), Shape::from((items, t, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        es: &candle_core::CudaStorage,
        el: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::embed;
        let (items, t, d) = Self::dims(el, cl, pl)?;
        let dev = es.device.clone();
        let norm = self.norm.as_ref().map(|n| {
            (
                n.weight.storage_and_layout(),
                n.bias.storage_and_layout(),
                n.eps,
            )
        });
        let norm = match &norm {
            Some(((ws, wl), (bs, bl), eps)) => match (&**ws, &**bs) {
                (candle_core::Storage::Cuda(ws), candle_core::Storage::Cuda(bs))
                    if wl.is_contiguous() && bl.is_contiguous() =>
                {
                    Some(((ws, *wl), (bs, *bl), *eps))
                }
                _ => {
                    candle_core::bail!("class and positions: the norm is not contiguous on the GPU")
                }
            },
            None => None,
        };
        let out = by_dtype!(es, self.name(), |T, suffix| {
            let views = [
                super::cuda_view::<T>(es, el)?,
                super::cuda_view::<T>(cs, cl)?,
                super::cuda_view::<T>(ps, pl)?,
            ];
            let norm = match norm {
                Some(((ws, wl), (bs, bl), eps)) => Some((
                    super::cuda_view::<T>(ws, wl)?,
                    super::cuda_view::<T>(bs, bl)?,
                    eps,
                )),
                None => None,
            };
            let norm = norm.as_ref().map(|(w, b, eps)| (w, b, *eps));
            let [e, c, p] = &views;
            let out = embed::class_positions::<T>(suffix, &dev, [e, c, p], norm, t)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from((items, t, d))))
    }

    fn bwd(
        &self,
        e: &Tensor,
        cls: &Tensor,
        pos: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.norm.is_some() {
            candle_core::bail!("class and positions with the norm is for inference only");
        }
        let (t, d) = pos.dims2()?;
        let all = grad
            .contiguous()?
            .apply_op1_no_bwd(&ClassPositionsBackward { t })?;
        let patch = e.elem_count() / d.max(1);
        let de = all.narrow(0, 0, patch)?.reshape(e.shape())?;
        let dpos = all.narrow(0, patch, t)?;
        let dcls = all.get(patch + t)?;
        let take = |w: &Tensor, g: Tensor| {
            if w.track_op() {
                divert_grad(w, g)
            } else {
                None
            }
        };
        Ok((e.track_op().then_some(de), take(cls, dcls), take(pos, dpos)))
    }
}

/// [`ClassPositions`]' backward: from the output's gradient `[items, t, d]`, `[items (t - 1)
/// + t + 1, d]`: the patch product's gradient, the positions' and the class token's.
struct ClassPositionsBackward {
    t: usize,
}

impl CustomOp1 for ClassPositionsBackward {
    fn name(&self) -> &'static str {
        "clipft-class-positions-backward"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (items, t, d) = gl.shape().dims3()?;
        if t != self.t {
            candle_core::bail!("{}: {t} positions, {} expected", self.name(), self.t);
        }
        let out = class_positions_backward_twin(&super::twin_input(gs, gl, self.name())?, t, d)?;
        let rows = items * (t - 1) + t + 1;
        Ok((super::twin_output(gs, out), Shape::from((rows, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::kernels::cuda::embed;
        let (items, t, d) = gl.shape().dims3()?;
        if t != self.t || !gl.is_contiguous() {
            candle_core::bail!(
                "{}: a contiguous gradient of {} positions",
                self.name(),
                self.t
            );
        }
        let dev = gs.device.clone();
        let out = by_dtype!(gs, self.name(), |T, suffix| {
            let g = super::cuda_view::<T>(gs, gl)?;
            let out = embed::class_positions_backward::<T>(suffix, &dev, &g, t, d)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((out, Shape::from((items * (t - 1) + t + 1, d))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;

    /// Values exact in bf16, so the f32 reference and the bf16 op start from the same numbers.
    fn values(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| half::bf16::from_f32((i as f32 * 0.731 + seed).sin() * 1.5).to_f32())
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn var(shape: &[usize], seed: f32, dt: DType) -> Var {
        Var::from_tensor(&values(shape, seed).to_dtype(dt).unwrap()).unwrap()
    }

    /// `got` (any dtype) within `tol` of the f32 `want`, relative to the larger of 1 and the
    /// largest |want|.
    fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
        let flat = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (g, w) = (flat(got), flat(want));
        assert_eq!(g.len(), w.len(), "{what}: lengths");
        let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!((a - b).abs() <= tol * scale, "{what}[{i}]: {a} against {b}");
        }
    }

    /// The gradients of `sum(y * up)`: each input's gradient for the upstream gradient `up`.
    fn grads_of(y: &Tensor, up: &Tensor) -> candle_core::backprop::GradStore {
        (y * up).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// The inference form of [`ClassPositions`]: with the pre-layer-norm `norm`.
    fn normed(e: &Var, cls: &Var, pos: &Var, norm: Norm) -> Tensor {
        let op = ClassPositions { norm: Some(norm) };
        e.as_tensor()
            .apply_op3_no_bwd(cls.as_tensor(), pos.as_tensor(), &op)
            .unwrap()
    }

    /// Relative tolerance of an op's output in `dt` against f32: the output's rounding.
    fn tol(dt: DType) -> f32 {
        if dt == DType::F32 {
            1e-6
        } else {
            4e-3
        }
    }

    /// The token op against candle's gathers and add in f32, forward and both tables'
    /// gradients (with repeated ids and positions), in f32 and bf16; a frozen table gets no
    /// gradient.
    #[test]
    fn token_positions_match_candles_ops() {
        let ids: Arc<[u32]> = [3u32, 1, 3, 0, 6, 3, 1].into();
        let positions: Arc<[u32]> = [0u32, 1, 2, 0, 1, 0, 3].into();
        let up32 = values(&[ids.len(), 12], 0.3);
        let (ti, pi) = (
            Tensor::new(&ids[..], &Device::Cpu).unwrap(),
            Tensor::new(&positions[..], &Device::Cpu).unwrap(),
        );
        let (table32, pos32) = (
            var(&[7, 12], 0.1, DType::F32),
            var(&[5, 12], 0.2, DType::F32),
        );
        let theirs = (table32.as_tensor().index_select(&ti, 0).unwrap()
            + pos32.as_tensor().index_select(&pi, 0).unwrap())
        .unwrap();
        let g_theirs = grads_of(&theirs, &up32);
        let op = TokenPositions {
            ids: ids.clone(),
            positions: positions.clone(),
        };
        for dt in [DType::F32, DType::BF16] {
            let (table, pos) = (var(&[7, 12], 0.1, dt), var(&[5, 12], 0.2, dt));
            let up = up32.to_dtype(dt).unwrap();
            let ours = table
                .as_tensor()
                .apply_op2(pos.as_tensor(), op.clone())
                .unwrap();
            close(&format!("{dt:?} forward"), &ours, &theirs, tol(dt));
            let g_ours = grads_of(&ours, &up);
            for (what, v, v32) in [("table", &table, &table32), ("positions", &pos, &pos32)] {
                let (a, b) = (g_ours.get(v).unwrap(), g_theirs.get(v32).unwrap());
                close(&format!("{dt:?} {what} gradient"), a, b, tol(dt));
            }
            // Frozen positions: only the table's gradient is computed.
            let frozen = pos.as_tensor().detach();
            let y = table.as_tensor().apply_op2(&frozen, op.clone()).unwrap();
            let g = grads_of(&y, &up);
            assert!(g.get(table.as_tensor()).is_some() && g.get(&frozen).is_none());
        }
        // Ids past the table are an error, not a read out of bounds.
        let bad = TokenPositions {
            ids: [7u32].into(),
            positions: [0u32].into(),
        };
        let err = values(&[7, 4], 0.0)
            .apply_op2(&values(&[2, 4], 0.0), bad)
            .unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }

    /// The unfolded patches are candle's permuted copy, in every dtype; a patch that does not
    /// tile the image is an error.
    #[test]
    fn unfold_is_the_permuted_copy() {
        let (b, c, size, p) = (2, 3, 12, 4);
        let g = size / p;
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let px = values(&[b, c, size, size], 0.2).to_dtype(dt).unwrap();
            let ours = px.apply_op1_no_bwd(&UnfoldPatches { patch: p }).unwrap();
            let theirs = px
                .reshape((b, c, g, p, g, p))
                .unwrap()
                .permute((0, 2, 4, 1, 3, 5))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b * g * g, c * p * p))
                .unwrap();
            close(
                &format!("{dt:?}"),
                &ours,
                &theirs.to_dtype(DType::F32).unwrap(),
                0.0,
            );
        }
        let px = values(&[1, 3, 10, 10], 0.2);
        assert!(px.apply_op1_no_bwd(&UnfoldPatches { patch: 4 }).is_err());
    }

    /// The vision op against candle's concatenation and broadcast add in f32, forward and the
    /// three gradients, in f32 and bf16; with the norm, against candle's layer norm after them.
    #[test]
    fn class_positions_match_candles_ops() {
        let (items, t, d) = (3, 5, 40);
        let up32 = values(&[items, t, d], 0.7);
        let shapes: [&[usize]; 3] = [&[items, t - 1, d], &[d], &[t, d]];
        let vars = |dt| shapes.map(|s| var(s, s.len() as f32 * 0.1 + 0.05, dt));
        let [e32, cls32, pos32] = vars(DType::F32);
        let c = cls32
            .as_tensor()
            .reshape((1, 1, d))
            .unwrap()
            .broadcast_as((items, 1, d))
            .unwrap();
        let theirs = Tensor::cat(&[&c, e32.as_tensor()], 1)
            .unwrap()
            .broadcast_add(pos32.as_tensor())
            .unwrap();
        let g_theirs = grads_of(&theirs, &up32);
        let (w, b) = (values(&[d], 0.4), values(&[d], 0.5));
        let normed32 = candle_nn::ops::layer_norm(&theirs, &w, &b, 1e-5).unwrap();
        for dt in [DType::F32, DType::BF16] {
            let [e, cls, pos] = vars(dt);
            let up = up32.to_dtype(dt).unwrap();
            let ours = e
                .as_tensor()
                .apply_op3(
                    cls.as_tensor(),
                    pos.as_tensor(),
                    ClassPositions { norm: None },
                )
                .unwrap();
            close(&format!("{dt:?} forward"), &ours, &theirs, tol(dt));
            let g_ours = grads_of(&ours, &up);
            for (what, v, v32) in [
                ("patches", &e, &e32),
                ("class", &cls, &cls32),
                ("positions", &pos, &pos32),
            ] {
                let (a, b) = (g_ours.get(v).unwrap(), g_theirs.get(v32).unwrap());
                close(&format!("{dt:?} {what} gradient"), a, b, tol(dt));
            }
            let norm = Norm {
                weight: w.to_dtype(dt).unwrap(),
                bias: b.to_dtype(dt).unwrap(),
                eps: 1e-5,
            };
            let normed = normed(&e, &cls, &pos, norm);
            // The norm's statistics over the rounded sums: a little more than the output's
            // rounding in bf16.
            let tol = if dt == DType::F32 { 1e-5 } else { 2e-2 };
            close(&format!("{dt:?} normed"), &normed, &normed32, tol);
        }
    }

    /// Every output and gradient of both ops on `dev` in `dt`, as f32 on the CPU, by name.
    fn all_results(dev: &Device, dt: DType) -> Vec<(String, Tensor)> {
        let on =
            |t: Tensor| Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(dev).unwrap()).unwrap();
        let back = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        };
        let mut out = Vec::new();
        let (table, pos) = (on(values(&[50, 72], 0.1)), on(values(&[9, 72], 0.2)));
        let op = TokenPositions {
            ids: [3u32, 1, 3, 0, 49, 3, 1, 7].into(),
            positions: [0u32, 1, 2, 0, 1, 0, 3, 8].into(),
        };
        let y = table.as_tensor().apply_op2(pos.as_tensor(), op).unwrap();
        let up = on(values(&[8, 72], 0.3));
        let g = grads_of(&y, up.as_tensor());
        out.push(("token rows".to_string(), back(&y)));
        out.push((
            "token table gradient".to_string(),
            back(g.get(&table).unwrap()),
        ));
        out.push((
            "token positions gradient".to_string(),
            back(g.get(&pos).unwrap()),
        ));
        let px = on(values(&[2, 3, 64, 64], 0.35)).as_tensor().detach();
        let rows = px.apply_op1_no_bwd(&UnfoldPatches { patch: 16 }).unwrap();
        out.push(("unfolded patches".to_string(), back(&rows)));
        let (items, t, d) = (3, 50, 160);
        let [e, cls, pos] = [
            values(&[items, t - 1, d], 0.4),
            values(&[d], 0.5),
            values(&[t, d], 0.6),
        ]
        .map(on);
        let x = e
            .as_tensor()
            .apply_op3(
                cls.as_tensor(),
                pos.as_tensor(),
                ClassPositions { norm: None },
            )
            .unwrap();
        let up = on(values(&[items, t, d], 0.7));
        let g = grads_of(&x, up.as_tensor());
        out.push(("class positions".to_string(), back(&x)));
        for (what, v) in [("patches", &e), ("class", &cls), ("positions", &pos)] {
            out.push((format!("{what} gradient"), back(g.get(v).unwrap())));
        }
        let norm = Norm {
            weight: on(values(&[d], 0.8)).as_tensor().detach(),
            bias: on(values(&[d], 0.9)).as_tensor().detach(),
            eps: 1e-5,
        };
        let y = normed(&e, &cls, &pos, norm);
        out.push(("class positions normed".to_string(), back(&y)));
        out
    }

    /// On a GPU (CUDA builds), the kernels against their twins through the ops, forward and
    /// gradients, in each dtype. Without a GPU it says so and checks nothing.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_embeddings_match_the_cpu() {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("cuda_embeddings_match_the_cpu: skipped, no GPU");
            return;
        };
        for (dt, tol) in [
            (DType::F32, 1e-5),
            (DType::F16, 2e-3),
            (DType::BF16, 1.6e-2),
        ] {
            let (gpu, cpu) = (all_results(&dev, dt), all_results(&Device::Cpu, dt));
            assert_eq!(gpu.len(), cpu.len());
            for ((what, g), (_, c)) in gpu.iter().zip(&cpu) {
                close(&format!("{dt:?} {what}"), g, c, tol);
            }
        }
    }

    /// The CPU's results are the ones the GPU test compares against: every one is there and
    /// finite, in each dtype.
    #[test]
    fn the_cpu_results_are_whole() {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let r = all_results(&Device::Cpu, dt);
            assert_eq!(r.len(), 9);
            for (what, t) in r {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                assert!(
                    !v.is_empty() && v.iter().all(|x| x.is_finite()),
                    "{dt:?} {what}"
                );
            }
        }
    }
}
