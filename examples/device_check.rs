//! Runs each tensor op the CLIP towers use, at ViT-B/32's shapes, on a GPU and on the CPU and
//! prints the largest difference per op; then whole towers of a model folder. It localises a
//! wrong result on a device to one op. Part of `scripts/gpu-check.sh`; needs a CUDA build:
//!
//!   cargo run --release --features cuda --example device_check -- [MODEL_DIR]

use candle_core::{DType, Device, Tensor, D};
use clipft::model::{Encoder, LoadOptions, ModelFiles, Towers};

fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    a.sub(&b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// `f` on the CPU and on `dev` over the same inputs; prints the largest difference.
fn check(
    name: &str,
    dev: &Device,
    inputs: &[&Tensor],
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<f32> {
    let on = |d: &Device| -> candle_core::Result<Vec<Tensor>> {
        inputs.iter().map(|t| t.to_device(d)).collect()
    };
    let cpu = f(&on(&Device::Cpu)?)?;
    let gpu = f(&on(dev)?)?;
    let d = max_diff(&cpu, &gpu)?;
    println!("{name:<40} {:?} max |cpu - device| = {d:.3e}", cpu.dims());
    Ok(d)
}

fn main() -> anyhow::Result<()> {
    let dev = Device::cuda_if_available(0)?;
    if dev.is_cpu() {
        anyhow::bail!("no CUDA device: build with --features cuda and run on a GPU machine");
    }
    let cpu = Device::Cpu;
    let (b, c, p, g, d, h) = (12usize, 3usize, 32usize, 7usize, 768usize, 12usize);
    let t = g * g + 1;
    let pixels = Tensor::randn(0f32, 1.0, (b, c, p * g, p * g), &cpu)?;
    let w = Tensor::randn(0f32, 0.02, (d, c * p * p), &cpu)?;
    let cls = Tensor::randn(0f32, 1.0, d, &cpu)?;
    let pos = Tensor::randn(0f32, 1.0, (t, d), &cpu)?;
    let x = Tensor::randn(0f32, 1.0, (b, t, d), &cpu)?;
    let ln_w = Tensor::randn(1f32, 0.1, d, &cpu)?;
    let ln_b = Tensor::randn(0f32, 0.1, d, &cpu)?;
    let scores = Tensor::randn(0f32, 1.0, (b, h, t, t), &cpu)?;
    let emb = Tensor::randn(0f32, 1.0, (b, g * g, d), &cpu)?;

    check("patch unfold (6-d permute)", &dev, &[&pixels], |i| {
        i[0].reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))
    })?;
    check("matmul x @ w.t()", &dev, &[&pixels, &w], |i| {
        let x = i[0].reshape((b * g * g, c * p * p))?;
        x.matmul(&i[1].t()?)
    })?;
    check(
        "cat(broadcast cls, patches, dim 1)",
        &dev,
        &[&cls, &emb],
        |i| {
            let cls = i[0].reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
            Tensor::cat(&[&cls, &i[1]], 1)
        },
    )?;
    check("broadcast_add position", &dev, &[&x, &pos], |i| {
        i[0].broadcast_add(&i[1])
    })?;
    check(
        "layer_norm (candle_nn::ops)",
        &dev,
        &[&x, &ln_w, &ln_b],
        |i| candle_nn::ops::layer_norm(&i[0], &i[1], &i[2], 1e-5),
    )?;
    check("split heads", &dev, &[&x], |i| {
        i[0].reshape((b, t, h, d / h))?
            .transpose(1, 2)?
            .contiguous()
    })?;
    check("q @ k.t() per head", &dev, &[&x], |i| {
        let q = i[0]
            .reshape((b, t, h, d / h))?
            .transpose(1, 2)?
            .contiguous()?;
        q.matmul(&q.t()?)
    })?;
    check("softmax_last_dim", &dev, &[&scores], |i| {
        candle_nn::ops::softmax_last_dim(&i[0])
    })?;
    check("softmax (composed)", &dev, &[&scores], |i| {
        candle_nn::ops::softmax(&i[0], D::Minus1)
    })?;
    check("probs @ v, merge heads", &dev, &[&scores, &x], |i| {
        let v = i[1]
            .reshape((b, t, h, d / h))?
            .transpose(1, 2)?
            .contiguous()?;
        i[0].matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
    })?;
    // clipft's fused attention over the stacked projection, forward and backward: the CUDA
    // kernels on the device, their CPU twins on the CPU.
    let qkv = Tensor::randn(0f32, 1.0, (b, 77, 3 * d), &cpu)?;
    let qkv_bias = Tensor::randn(0f32, 0.5, 3 * d, &cpu)?;
    let dout = Tensor::randn(0f32, 1.0, (b, 77, d), &cpu)?;
    // Packed captions: lengths from 1 to 77 end to end (the text tower's layout).
    let lens: Vec<usize> = (0..b).map(|i| [77, 9, 1, 40, 64, 17][i % 6]).collect();
    let packing = clipft::model::kernels::seqs::Packing::from_lens(&lens)?;
    let packed = std::sync::Arc::new(clipft::model::ops::packed::PackedSeqs::new(packing));
    for dt in [DType::F32, DType::F16, DType::BF16] {
        for (seq, causal, packed) in [
            (t, false, None),
            (77, true, None),
            (77, true, Some(&packed)),
        ] {
            let op = clipft::model::ops::fused_attention::FusedAttention {
                heads: h,
                scale: ((d / h) as f32).powf(-0.5),
                causal,
                packed: packed.cloned(),
                tensor_cores: false,
            };
            let cut = |x: &Tensor| match packed {
                Some(p) => {
                    let w = x.dim(2)?;
                    x.reshape((x.elem_count() / w, w))?
                        .narrow(0, 0, p.rows())?
                        .to_dtype(dt)
                }
                None => x.narrow(1, 0, seq)?.contiguous()?.to_dtype(dt),
            };
            let packed_name = if packed.is_some() { " packed" } else { "" };
            let name = format!("fused attention {dt:?} t={seq} causal={causal}{packed_name}");
            check(&name, &dev, &[&qkv, &qkv_bias], |i| {
                cut(&i[0])?.apply_op2_no_bwd(&i[1].to_dtype(dt)?, &op)
            })?;
            let name =
                format!("fused attention backward {dt:?} t={seq} causal={causal}{packed_name}");
            check(&name, &dev, &[&qkv, &qkv_bias, &dout], |i| {
                let (x, bias) = (cut(&i[0])?, i[1].to_dtype(dt)?);
                let o = x.apply_op2_no_bwd(&bias, &op)?;
                let back = clipft::model::ops::fused_attention::AttentionBackward {
                    op: op.clone(),
                    bias,
                };
                x.apply_op3_no_bwd(&o, &cut(&i[2])?, &back)
            })?;
            if dt != DType::F32 {
                // The tensor-core forward (f16, bf16) against its twin.
                let tc = clipft::model::ops::fused_attention::FusedAttention {
                    tensor_cores: true,
                    ..op.clone()
                };
                let name =
                    format!("tensor-core attention {dt:?} t={seq} causal={causal}{packed_name}");
                check(&name, &dev, &[&qkv, &qkv_bias], |i| {
                    cut(&i[0])?.apply_op2_no_bwd(&i[1].to_dtype(dt)?, &tc)
                })?;
            }
        }
    }
    // clipft's layer norm with its backward.
    {
        use clipft::model::ops::fused_norm::{FusedLayerNorm, LayerNormBackward};
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let c = |x: &Tensor| x.to_dtype(dt);
            check(
                &format!("fused layer norm {dt:?}"),
                &dev,
                &[&x, &ln_w, &ln_b],
                |i| {
                    c(&i[0])?.apply_op3_no_bwd(
                        &c(&i[1])?,
                        &c(&i[2])?,
                        &FusedLayerNorm { eps: 1e-5 },
                    )
                },
            )?;
            check(
                &format!("fused layer norm backward {dt:?}"),
                &dev,
                &[&x, &ln_w, &x],
                |i| {
                    c(&i[0])?.apply_op3_no_bwd(
                        &c(&i[1])?,
                        &c(&i[2])?,
                        &LayerNormBackward {
                            eps: 1e-5,
                            residual: None,
                        },
                    )
                },
            )?;
        }
    }
    // clipft's fused linear tails: the CUDA kernels on the device, their twins on the CPU.
    {
        use clipft::model::kernels::cuda::elementwise::Act;
        use clipft::model::ops::fused_tail::{BiasAct, BiasActBackward, BiasResidual};
        for dt in [DType::F32, DType::F16, DType::BF16] {
            for act in [Act::QuickGelu, Act::Gelu] {
                let name = format!("fused bias + {act:?} {dt:?}");
                check(&name, &dev, &[&x, &ln_b], |i| {
                    i[0].to_dtype(dt)?
                        .apply_op2_no_bwd(&i[1].to_dtype(dt)?, &BiasAct { act })
                })?;
                let name = format!("fused bias + {act:?} backward {dt:?}");
                check(&name, &dev, &[&x, &ln_b, &x], |i| {
                    i[0].to_dtype(dt)?.apply_op3_no_bwd(
                        &i[1].to_dtype(dt)?,
                        &i[2].to_dtype(dt)?,
                        &BiasActBackward { act },
                    )
                })?;
            }
            check(&format!("column sum {dt:?}"), &dev, &[&x], |i| {
                i[0].to_dtype(dt)?
                    .apply_op1_no_bwd(&clipft::model::ops::fused_tail::ColumnSum)
            })?;
            check(
                &format!("fused bias + residual {dt:?}"),
                &dev,
                &[&x, &ln_b, &x],
                |i| {
                    i[0].to_dtype(dt)?.apply_op3_no_bwd(
                        &i[1].to_dtype(dt)?,
                        &i[2].to_dtype(dt)?,
                        &BiasResidual,
                    )
                },
            )?;
        }
    }
    check("quick_gelu", &dev, &[&x], |i| {
        &i[0] * candle_nn::ops::sigmoid(&(&i[0] * 1.702)?)?
    })?;
    check("index_select pooled rows", &dev, &[&x], |i| {
        let idx: Vec<u32> = (0..b as u32).map(|k| k * t as u32).collect();
        let idx = Tensor::new(idx.as_slice(), i[0].device())?;
        i[0].reshape((b * t, d))?.index_select(&idx, 0)
    })?;
    for dt in [DType::F16, DType::BF16] {
        check(&format!("to_dtype {dt:?} and back"), &dev, &[&x], |i| {
            i[0].to_dtype(dt)?.to_dtype(DType::F32)
        })?;
    }

    // Whole towers: the same model folder on both devices.
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("{}/tests/fixtures/clip-tiny", env!("CARGO_MANIFEST_DIR")));
    let files = ModelFiles::from_dir(std::path::Path::new(&model))?;
    let load = |device: &Device| {
        Encoder::load(
            &files,
            &LoadOptions {
                towers: Towers::ALL,
                device: device.clone(),
                dtype: DType::F32,
                ..Default::default()
            },
        )
    };
    let (on_cpu, on_dev) = (load(&cpu)?, load(&dev)?);
    let (ih, iw) = on_cpu.image_preprocessor()?.output_size();
    let images: Vec<Vec<f32>> = (0..b)
        .map(|k| {
            (0..3 * ih * iw)
                .map(|j| ((j * 7 + k * 13) % 255) as f32 / 64.0 - 2.0)
                .collect()
        })
        .collect();
    for n in [1, b] {
        let a = on_cpu.embed_pixels(&images[..n])?;
        let z = on_dev.embed_pixels(&images[..n])?;
        let worst = a
            .iter()
            .zip(&z)
            .map(|(a, z)| {
                let dot: f32 = a.iter().zip(z).map(|(x, y)| x * y).sum();
                let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
                let nz: f32 = z.iter().map(|x| x * x).sum::<f32>().sqrt();
                dot / (na * nz)
            })
            .fold(f32::INFINITY, f32::min);
        println!("vision tower {model}, batch {n}: lowest cosine cpu vs device {worst:.7}");
    }
    let texts = [
        "a photo of a cat",
        "two dogs playing in the snow on a sunny day",
    ];
    let a = on_cpu.embed_texts(&texts)?;
    let z = on_dev.embed_texts(&texts)?;
    let dot: f32 = a[1].iter().zip(&z[1]).map(|(x, y)| x * y).sum();
    let n: f32 = a[1].iter().map(|x| x * x).sum::<f32>().sqrt()
        * z[1].iter().map(|x| x * x).sum::<f32>().sqrt();
    println!("text tower {model}: cosine cpu vs device {:.7}", dot / n);
    if std::env::var_os("DEVICE_CHECK_TIMING").is_some() {
        timing(&files, &dev)?;
    }
    Ok(())
}

/// Milliseconds of `f` (after one warm-up call), the device synchronised on both ends.
fn ms<R>(dev: &Device, mut f: impl FnMut() -> anyhow::Result<R>) -> anyhow::Result<f64> {
    f()?;
    dev.synchronize()?;
    let n = 5;
    let t = std::time::Instant::now();
    for _ in 0..n {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / n as f64)
}

/// Where a batch of 256 goes: inference (f16) and one training step (bf16 compute).
fn timing(files: &ModelFiles, dev: &Device) -> anyhow::Result<()> {
    use clipft::model::Mode;
    use clipft::trainer::optim::{OptimizerKind, OptimizerParams};
    use clipft::trainer::train::TrainModel;
    let b = 256;
    let enc = Encoder::load(
        files,
        &LoadOptions {
            towers: Towers::ALL,
            device: dev.clone(),
            dtype: DType::F16,
            ..Default::default()
        },
    )?;
    let (h, w) = enc.image_preprocessor()?.output_size();
    let images: Vec<Vec<f32>> = (0..b).map(|_| vec![0.5f32; 3 * h * w]).collect();
    let flat: Vec<f32> = images.iter().flatten().copied().collect();
    let on_dev = Tensor::from_vec(flat.clone(), (b, 3, h, w), dev)?;
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            let mut r = vec![49406];
            r.extend((0..75).map(|j| 1 + ((i * 75 + j) % 49000) as u32));
            r.push(49407);
            r
        })
        .collect();
    let text = clipft::model::TextBatch::new(&rows, 2, dev)?;
    println!("timing, batch {b}, f16 inference:");
    println!(
        "  embed_pixels (host images in, host features out) {:8.2} ms",
        ms(dev, || Ok(enc.embed_pixels(&images)?))?
    );
    println!(
        "  flatten the host images                          {:8.2} ms",
        ms(dev, || Ok(images
            .iter()
            .flatten()
            .copied()
            .collect::<Vec<f32>>()))?
    );
    println!(
        "  upload f32 pixels                                {:8.2} ms",
        ms(dev, || Ok(Tensor::from_vec(
            flat.clone(),
            (b, 3, h, w),
            dev
        )?))?
    );
    println!(
        "  image_features on device pixels                  {:8.2} ms",
        ms(dev, || Ok(enc
            .clip
            .image_features(&on_dev, Mode::Inference)?))?
    );
    println!(
        "  embed_token_rows (77 tokens)                     {:8.2} ms",
        ms(dev, || Ok(enc.embed_token_rows(&rows)?))?
    );
    println!(
        "  text_features on a device batch                  {:8.2} ms",
        ms(dev, || Ok(enc
            .clip
            .text_features(&text, Mode::Inference)?))?
    );
    for dt in [DType::F16, DType::BF16, DType::F32] {
        let x = Tensor::randn(0f32, 1.0, (b * 50, 768), dev)?.to_dtype(dt)?;
        let wt = Tensor::randn(0f32, 1.0, (3072, 768), dev)?.to_dtype(dt)?;
        let t = ms(dev, || Ok(x.matmul(&wt.t()?)?))?;
        println!(
            "  matmul [{}x768]x[768x3072] {dt:?}: {t:.3} ms = {:.0} TFLOP/s",
            b * 50,
            2.0 * (b * 50 * 768 * 3072) as f64 / t / 1e9
        );
    }
    drop(enc);
    for dt in [DType::BF16, DType::F32] {
        let m = TrainModel::load(files, dev)?.with_compute_dtype(dt)?;
        let mut opt = m.optimizer(OptimizerParams::new(OptimizerKind::AdamW, 1e-5, 0.01))?;
        let pixels = on_dev.to_dtype(DType::F32)?;
        println!("timing, batch {b}, training step, {dt:?} compute:");
        println!(
            "  whole step                                       {:8.2} ms",
            ms(dev, || Ok(m.train_step(&mut opt, &text, &pixels)?))?
        );
        println!(
            "  forward + loss                                   {:8.2} ms",
            ms(dev, || Ok(m
                .loss(&text, &pixels)?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?))?
        );
        let loss = m.loss(&text, &pixels)?;
        println!(
            "  backward                                         {:8.2} ms",
            ms(dev, || Ok(loss.backward()?))?
        );
        let grads = loss.backward()?;
        println!(
            "  optimizer step                                   {:8.2} ms",
            ms(dev, || Ok(opt.step(&grads)?))?
        );
        let clip = &m.clip;
        println!(
            "  text forward (train mode, f32 weights)           {:8.2} ms",
            ms(dev, || Ok(clip.text_features(&text, Mode::Train)?))?
        );
        println!(
            "  image forward (train mode, f32 weights)          {:8.2} ms",
            ms(dev, || Ok(clip.image_features(&pixels, Mode::Train)?))?
        );
    }
    Ok(())
}
