//! A tower as an ONNX graph, for ONNX Runtime and clip-as-service's ONNX executor.
//!
//! Finetuner's `to_onnx=True` put a `model.onnx` in each submodel folder of the artifact, and
//! clip-as-service serves a fine-tuned CLIP only through its ONNX executor (`model_path`: a folder
//! holding `textual.onnx` and `visual.onnx`). The graphs here have the inputs and output both of
//! them use: the text tower takes `input_ids` and `attention_mask` (int32 `[batch, sequence]`, the
//! sequence dynamic up to the config's 77 positions) and the vision tower `pixel_values` (float32
//! `[batch, channels, size, size]`); both give `embedding`, the projected features, float32 and
//! not normalised, the numbers `clipft encode` gives for the same inputs.
//!
//! The graph is written out operator by operator from the config and the checkpoint's tensors
//! (opset 17, IR version 8: ONNX Runtime 1.13 and later, the first with opset 17's layer
//! norm), f32 throughout; clip-as-service converts it to f16 itself on a GPU, which is why the
//! token ids stay int32. It computes what the model definition in [`super::text`] and
//! [`super::vision`] computes, in the plain order (every row through every block); the tests run
//! it in ONNX Runtime against the model, in f32 and after that conversion. `attention_mask`
//! is declared but not read: under the causal mask the pooled end-of-text token never sees the
//! padding after it, which is all the mask could hide.

mod graph;
pub mod proto;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use prost::Message;

use super::config::{Activation, TextConfig, VisionConfig};
use super::layers::EncoderShape;
use super::{ClipConfig, ModelError, ModelFiles, Towers};
use graph::{Attr, Dim, Graph};
use proto::{data_type, ModelProto, OperatorSetIdProto};

/// `TensorProto.DataType`'s BOOL, for the one cast to it.
const BOOL: i64 = 9;

/// The operator set the graphs are written against (`LayerNormalization` is in it).
pub const OPSET: i64 = 17;
/// The IR version of opset 17.
pub const IR_VERSION: i64 = 8;

/// Which tower to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tower {
    Text,
    Vision,
}

impl Tower {
    /// The file name clip-as-service's ONNX executor looks for in its `model_path`.
    pub fn clip_server_file(self) -> &'static str {
        match self {
            Tower::Text => "textual.onnx",
            Tower::Vision => "visual.onnx",
        }
    }

    fn towers(self) -> Towers {
        match self {
            Tower::Text => Towers::TEXT,
            Tower::Vision => Towers::VISION,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Tower::Text => "text",
            Tower::Vision => "vision",
        }
    }
}

/// `tower` of the model in `files` as the bytes of an ONNX file (`artifact::replace_file`
/// writes it so that a reader never sees half a graph).
pub fn tower_onnx(files: &ModelFiles, tower: Tower) -> Result<Vec<u8>, ModelError> {
    Ok(tower_model(files, tower)?.encode_to_vec())
}

/// `tower` of the model in `files` as an ONNX model, its weights read from the checkpoint as f32
/// (whatever format and dtype it is stored in).
pub fn tower_model(files: &ModelFiles, tower: Tower) -> Result<ModelProto, ModelError> {
    let config = ClipConfig::from_file(&files.config)?;
    let missing = || ModelError::NotFound {
        what: files.source.clone(),
        msg: format!("has no {} tower in its config.json", tower.name()),
    };
    let vb = files.var_builder(tower.towers(), DType::F32, &Device::Cpu)?;
    let w = Weights {
        vb,
        source: &files.source,
    };
    let mut g = Graph::default();
    let p = config.projection_dim;
    let summary = match tower {
        Tower::Text => {
            let c = config.text.as_ref().ok_or_else(missing)?;
            text_graph(&mut g, &w, c, p)?;
            format!(
                "inputs input_ids, attention_mask (int32 [batch, sequence <= {}]); ",
                c.max_position_embeddings
            )
        }
        Tower::Vision => {
            let c = config.vision.as_ref().ok_or_else(missing)?;
            vision_graph(&mut g, &w, c, p)?;
            format!(
                "input pixel_values (float32 [batch, {}, {}, {}], normalised); ",
                c.num_channels, c.image_size, c.image_size
            )
        }
    };
    check_size(g.weight_bytes(), &files.source, tower)?;
    let doc = format!(
        "CLIP {} tower of {}: {summary}output embedding (float32 [batch, {p}]), the projected \
         features, not normalised",
        tower.name(),
        files.source
    );
    Ok(ModelProto {
        ir_version: IR_VERSION,
        producer_name: "clipft".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: doc.clone(),
        graph: Some(g.finish(&format!("clip_{}", tower.name()), doc)),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
    })
}

/// The most weight bytes one file holds: protobuf messages end at 2 GiB, and readers (ONNX
/// Runtime, the onnx package) refuse larger ones; the rest of the graph needs a little room.
/// Every backbone `clipft models` lists fits (ViT-L/14's vision tower is 1.2 GB); ViT-H and
/// larger would need ONNX's external-data files, which this export does not write.
pub const MAX_WEIGHT_BYTES: u64 = (2 << 30) - (16 << 20);

/// Whether both towers of `config` fit one ONNX file each ([`MAX_WEIGHT_BYTES`]), from the
/// config alone: `fit --to-onnx` asks before training, not when the artifact is written.
pub fn check_exportable(config: &ClipConfig, source: &str) -> Result<(), ModelError> {
    let blocks = |s: EncoderShape| s.layers * (4 * s.dim * (s.dim + 1) + 2 * s.dim * s.inter);
    let p = config.projection_dim;
    if let Some(c) = &config.text {
        let table = (c.vocab_size + c.max_position_embeddings) * c.hidden_size;
        let params = blocks(EncoderShape::of_text(c)) + table + c.hidden_size * p;
        check_size(4 * params as u64, source, Tower::Text)?;
    }
    if let Some(c) = &config.vision {
        let d = c.hidden_size;
        let patches = d * c.num_channels * c.patch_size * c.patch_size;
        let positions = (c.grid() * c.grid() + 1) * d;
        let params = blocks(EncoderShape::of_vision(c)) + patches + positions + d * p;
        check_size(4 * params as u64, source, Tower::Vision)?;
    }
    Ok(())
}

fn check_size(bytes: u64, source: &str, tower: Tower) -> Result<(), ModelError> {
    if bytes <= MAX_WEIGHT_BYTES {
        return Ok(());
    }
    Err(ModelError::InvalidInput {
        msg: format!(
            "the {} tower of {source} holds {:.2} GB of f32 weights, more than one ONNX file can \
             hold (2 GiB, protobuf's limit); export of external weight files is not supported",
            tower.name(),
            bytes as f64 / 1e9
        ),
    })
}

/// The checkpoint's tensors, by their Hugging Face names, as f32 on the CPU.
struct Weights<'a> {
    vb: VarBuilder<'static>,
    source: &'a str,
}

impl Weights<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.vb
            .get(shape.to_vec(), name)
            .map_err(|e| ModelError::Weights {
                files: self.source.to_string(),
                msg: super::candle_message(&e),
            })
    }

    /// `name`'s values, row-major.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        Ok(self.tensor(name, shape)?.flatten_all()?.to_vec1()?)
    }

    /// A linear layer's weight (`[out, in]`) transposed to `[in, out]`, the right operand of
    /// `MatMul`; scaled by `scale`.
    fn transposed(
        &self,
        name: &str,
        out: usize,
        inp: usize,
        scale: f32,
    ) -> Result<Vec<f32>, ModelError> {
        let t = self.tensor(name, &[out, inp])?.t()?.contiguous()?;
        let t = if scale == 1.0 { t } else { (t * scale as f64)? };
        Ok(t.flatten_all()?.to_vec1()?)
    }
}

/// `x @ W^T + b` for the linear layer `prefix` (`[out, in]` weight).
fn linear(
    g: &mut Graph,
    w: &Weights,
    prefix: &str,
    (inp, out): (usize, usize),
    bias: bool,
    x: &str,
) -> Result<String, ModelError> {
    let name = format!("{prefix}.weight");
    let wt = w.transposed(&name, out, inp, 1.0)?;
    let wt = g.weight(&format!("{name}.T"), &[inp, out], &wt);
    let y = g.op("MatMul", &[x, &wt], &[]);
    if !bias {
        return Ok(y);
    }
    let name = format!("{prefix}.bias");
    let b = w.values(&name, &[out])?;
    let b = g.weight(&name, &[out], &b);
    Ok(g.op("Add", &[&y, &b], &[]))
}

fn layer_norm(
    g: &mut Graph,
    w: &Weights,
    prefix: &str,
    dim: usize,
    eps: f64,
    x: &str,
) -> Result<String, ModelError> {
    let mut names = Vec::new();
    for part in ["weight", "bias"] {
        let name = format!("{prefix}.{part}");
        let v = w.values(&name, &[dim])?;
        names.push(g.weight(&name, &[dim], &v));
    }
    Ok(g.op(
        "LayerNormalization",
        &[x, &names[0], &names[1]],
        &[
            ("axis", Attr::Int(-1)),
            ("epsilon", Attr::Float(eps as f32)),
        ],
    ))
}

/// Multi-head self-attention over `[batch, seq, dim]`: one product for the stacked Q, K and V
/// projections (Q's weights and bias prescaled by `1/sqrt(head_dim)`), `mask` added to the
/// scores when given.
fn attention(
    g: &mut Graph,
    w: &Weights,
    prefix: &str,
    b: &EncoderShape,
    x: &str,
    mask: Option<&str>,
) -> Result<String, ModelError> {
    let (d, h) = (b.dim, b.heads);
    let hd = d / h;
    let scale = (hd as f32).powf(-0.5);
    // [in, 3 * out]: the three transposed weights side by side, row by row.
    let mut wt = vec![0f32; d * 3 * d];
    let mut bias = Vec::with_capacity(3 * d);
    for (i, (part, s)) in [("q_proj", scale), ("k_proj", 1.0), ("v_proj", 1.0)]
        .into_iter()
        .enumerate()
    {
        let t = w.transposed(&format!("{prefix}.{part}.weight"), d, d, s)?;
        for (r, row) in t.chunks_exact(d).enumerate() {
            wt[r * 3 * d + i * d..r * 3 * d + (i + 1) * d].copy_from_slice(row);
        }
        let bv = w.values(&format!("{prefix}.{part}.bias"), &[d])?;
        bias.extend(bv.iter().map(|v| v * s));
    }
    let wt = g.weight(&format!("{prefix}.qkv.weight.T"), &[d, 3 * d], &wt);
    let bias = g.weight(&format!("{prefix}.qkv.bias"), &[3 * d], &bias);
    let qkv = g.op("MatMul", &[x, &wt], &[]);
    let qkv = g.op("Add", &[&qkv, &bias], &[]);
    let split = g.ints(&[d as i64; 3]);
    let parts = g.op_n("Split", &[&qkv, &split], &[("axis", Attr::Int(-1))], 3);
    let heads = g.ints(&[0, 0, h as i64, hd as i64]);
    let mut split_heads = |v: &str, perm: Vec<i64>| {
        let r = g.op("Reshape", &[v, &heads], &[]);
        g.op("Transpose", &[&r], &[("perm", Attr::Ints(perm))])
    };
    let q = split_heads(&parts[0], vec![0, 2, 1, 3]);
    let k = split_heads(&parts[1], vec![0, 2, 3, 1]);
    let v = split_heads(&parts[2], vec![0, 2, 1, 3]);
    let mut scores = g.op("MatMul", &[&q, &k], &[]);
    if let Some(m) = mask {
        scores = g.op("Add", &[&scores, m], &[]);
    }
    let probs = g.op("Softmax", &[&scores], &[("axis", Attr::Int(-1))]);
    let ctx = g.op("MatMul", &[&probs, &v], &[]);
    let ctx = g.op(
        "Transpose",
        &[&ctx],
        &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
    );
    let merged = g.ints(&[0, 0, d as i64]);
    let ctx = g.op("Reshape", &[&ctx, &merged], &[]);
    linear(g, w, &format!("{prefix}.out_proj"), (d, d), true, &ctx)
}

fn activation(g: &mut Graph, act: Activation, x: &str) -> String {
    match act {
        Activation::QuickGelu => {
            let c = g.scalar(1.702);
            let s = g.op("Mul", &[x, &c], &[]);
            let s = g.op("Sigmoid", &[&s], &[]);
            g.op("Mul", &[x, &s], &[])
        }
        Activation::Gelu => {
            let r = g.scalar(std::f32::consts::FRAC_1_SQRT_2);
            let one = g.scalar(1.0);
            let half = g.scalar(0.5);
            let e = g.op("Mul", &[x, &r], &[]);
            let e = g.op("Erf", &[&e], &[]);
            let e = g.op("Add", &[&e, &one], &[]);
            let y = g.op("Mul", &[x, &e], &[]);
            g.op("Mul", &[&y, &half], &[])
        }
    }
}

/// The pre-norm transformer blocks of `prefix` (`.../encoder`).
fn encoder(
    g: &mut Graph,
    w: &Weights,
    prefix: &str,
    b: &EncoderShape,
    mut x: String,
    mask: Option<&str>,
) -> Result<String, ModelError> {
    for i in 0..b.layers {
        let l = format!("{prefix}.layers.{i}");
        let h = layer_norm(g, w, &format!("{l}.layer_norm1"), b.dim, b.eps, &x)?;
        let a = attention(g, w, &format!("{l}.self_attn"), b, &h, mask)?;
        x = g.op("Add", &[&x, &a], &[]);
        let h = layer_norm(g, w, &format!("{l}.layer_norm2"), b.dim, b.eps, &x)?;
        let h = linear(g, w, &format!("{l}.mlp.fc1"), (b.dim, b.inter), true, &h)?;
        let h = activation(g, b.act, &h);
        let h = linear(g, w, &format!("{l}.mlp.fc2"), (b.inter, b.dim), true, &h)?;
        x = g.op("Add", &[&x, &h], &[]);
    }
    Ok(x)
}

/// The text tower: token and position embeddings, causal blocks, the final norm at the pooled
/// token (chosen as [`super::text::pool_position`] chooses it), the projection.
fn text_graph(g: &mut Graph, w: &Weights, c: &TextConfig, proj: usize) -> Result<(), ModelError> {
    let (d, n) = (c.hidden_size, c.max_position_embeddings);
    let batch = [Dim::Named("batch_size"), Dim::Named("sequence_length")];
    let ids = g.input("input_ids", data_type::INT32, &batch);
    g.input("attention_mask", data_type::INT32, &batch);
    let ids64 = g.op(
        "Cast",
        &[&ids],
        &[("to", Attr::Int(data_type::INT64 as i64))],
    );
    let name = "text_model.embeddings.token_embedding.weight";
    let tokens = w.values(name, &[c.vocab_size, d])?;
    let tokens = g.weight(name, &[c.vocab_size, d], &tokens);
    let x = g.op("Gather", &[&tokens, &ids64], &[("axis", Attr::Int(0))]);
    // The first `sequence` rows of the position table and of the causal mask.
    let shape = g.op("Shape", &[&ids], &[]);
    let (one, two, zero) = (g.ints(&[1]), g.ints(&[2]), g.ints(&[0]));
    let seq = g.op("Slice", &[&shape, &one, &two, &zero], &[]);
    let name = "text_model.embeddings.position_embedding.weight";
    let positions = w.values(name, &[n, d])?;
    let positions = g.weight(name, &[n, d], &positions);
    let positions = g.op("Slice", &[&positions, &zero, &seq, &zero], &[]);
    let x = g.op("Add", &[&x, &positions], &[]);
    let mut causal = vec![0f32; n * n];
    for (r, row) in causal.chunks_exact_mut(n).enumerate() {
        row[r + 1..].fill(f32::MIN);
    }
    let causal = g.weight("causal_mask", &[n, n], &causal);
    let ends = g.op("Concat", &[&seq, &seq], &[("axis", Attr::Int(0))]);
    let (starts, axes) = (g.ints(&[0, 0]), g.ints(&[0, 1]));
    let mask = g.op("Slice", &[&causal, &starts, &ends, &axes], &[]);
    let block = EncoderShape::of_text(c);
    let x = encoder(g, w, "text_model.encoder", &block, x, Some(&mask))?;
    let x = layer_norm(g, w, "text_model.final_layer_norm", d, c.layer_norm_eps, &x)?;
    // On the int32 ids, never a float cast: clip-as-service converts a graph to f16 on a GPU,
    // casts included, and in f16 the start and end-of-text ids (49406, 49407) are one number.
    // ArgMax takes the first maximum, as torch and `pool_position` do.
    let pick = [("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))];
    let pooled_at = if c.eos_token_id == 2 {
        g.op("ArgMax", &[&ids], &pick)
    } else {
        let to_int = [("to", Attr::Int(data_type::INT32 as i64))];
        let eos = g.ints(&[c.eos_token_id as i64]);
        let is_eos = g.op("Equal", &[&ids64, &eos], &[]);
        let is_eos = g.op("Cast", &[&is_eos], &to_int);
        let first = g.op("ArgMax", &[&is_eos], &pick);
        let found = g.op(
            "ReduceMax",
            &[&is_eos],
            &[("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
        );
        let found = g.op("Cast", &[&found], &[("to", Attr::Int(BOOL))]);
        let last = g.op("Sub", &[&seq, &one], &[]);
        g.op("Where", &[&found, &first, &last], &[])
    };
    let at = g.op("Unsqueeze", &[&pooled_at, &one], &[]);
    let pooled = g.op("GatherND", &[&x, &at], &[("batch_dims", Attr::Int(1))]);
    embedding(g, w, "text_projection", (d, proj), &pooled)
}

/// The projection of the pooled features, as the graph's `embedding` output.
fn embedding(
    g: &mut Graph,
    w: &Weights,
    projection: &str,
    (d, proj): (usize, usize),
    pooled: &str,
) -> Result<(), ModelError> {
    let e = linear(g, w, projection, (d, proj), false, pooled)?;
    let dims = [Dim::Named("batch_size"), Dim::Fixed(proj)];
    g.output(&e, "embedding", data_type::FLOAT, &dims);
    Ok(())
}

/// The vision tower: patches by a strided convolution, the class token and positions, the
/// pre-norm, the blocks, the post-norm of the class token, the projection.
fn vision_graph(
    g: &mut Graph,
    w: &Weights,
    c: &VisionConfig,
    proj: usize,
) -> Result<(), ModelError> {
    let (d, p, ch, size) = (c.hidden_size, c.patch_size, c.num_channels, c.image_size);
    let pixels = g.input(
        "pixel_values",
        data_type::FLOAT,
        &[
            Dim::Named("batch_size"),
            Dim::Fixed(ch),
            Dim::Fixed(size),
            Dim::Fixed(size),
        ],
    );
    let name = "vision_model.embeddings.patch_embedding.weight";
    let kernel = w.values(name, &[d, ch, p, p])?;
    let kernel = g.weight(name, &[d, ch, p, p], &kernel);
    let patches = g.op(
        "Conv",
        &[&pixels, &kernel],
        &[
            ("kernel_shape", Attr::Ints(vec![p as i64; 2])),
            ("strides", Attr::Ints(vec![p as i64; 2])),
        ],
    );
    let flat = g.ints(&[0, d as i64, -1]);
    let patches = g.op("Reshape", &[&patches, &flat], &[]);
    let patches = g.op(
        "Transpose",
        &[&patches],
        &[("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    // The class token, one per image.
    let name = "vision_model.embeddings.class_embedding";
    let class = w.values(name, &[d])?;
    let class = g.weight(name, &[1, 1, d], &class);
    let shape = g.op("Shape", &[&pixels], &[]);
    let (zero, one) = (g.ints(&[0]), g.ints(&[1]));
    let batch = g.op("Slice", &[&shape, &zero, &one, &zero], &[]);
    let rest = g.ints(&[1, d as i64]);
    let class_shape = g.op("Concat", &[&batch, &rest], &[("axis", Attr::Int(0))]);
    let class = g.op("Expand", &[&class, &class_shape], &[]);
    let x = g.op("Concat", &[&class, &patches], &[("axis", Attr::Int(1))]);
    let n = c.grid() * c.grid() + 1;
    let name = "vision_model.embeddings.position_embedding.weight";
    let positions = w.values(name, &[n, d])?;
    let positions = g.weight(name, &[n, d], &positions);
    let x = g.op("Add", &[&x, &positions], &[]);
    let x = layer_norm(g, w, "vision_model.pre_layrnorm", d, c.layer_norm_eps, &x)?;
    let block = EncoderShape::of_vision(c);
    let x = encoder(g, w, "vision_model.encoder", &block, x, None)?;
    let class = g.op("Gather", &[&x, &zero], &[("axis", Attr::Int(1))]);
    let class = g.op("Squeeze", &[&class, &one], &[]);
    let class = layer_norm(
        g,
        w,
        "vision_model.post_layernorm",
        d,
        c.layer_norm_eps,
        &class,
    )?;
    embedding(g, w, "visual_projection", (d, proj), &class)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::path::Path;

    fn tiny() -> ModelFiles {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tiny");
        ModelFiles::from_dir(&dir).unwrap()
    }

    /// Every value a node reads exists before it (a graph input, an initializer or an earlier
    /// node's output), names are unique, and the graph ends in the declared output.
    fn check_wiring(m: &ModelProto, inputs: &[&str]) {
        assert_eq!(
            (m.ir_version, m.opset_import[0].version),
            (IR_VERSION, OPSET)
        );
        let g = m.graph.as_ref().unwrap();
        let declared: Vec<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(declared, inputs);
        let mut known: HashSet<&str> = declared.iter().copied().collect();
        for t in &g.initializer {
            assert!(known.insert(&t.name), "initializer {} twice", t.name);
            let n: i64 = t.dims.iter().product();
            let width = if t.data_type == data_type::FLOAT {
                4
            } else {
                8
            };
            assert_eq!(t.raw_data.len() as i64, n * width, "{}", t.name);
        }
        for node in &g.node {
            for i in &node.input {
                assert!(
                    known.contains(i.as_str()),
                    "{} reads {i} before it exists",
                    node.name
                );
            }
            for o in &node.output {
                assert!(known.insert(o), "{o} written twice");
            }
        }
        assert_eq!(g.output.len(), 1);
        assert_eq!(g.output[0].name, "embedding");
        assert_eq!(g.node.last().unwrap().output, vec!["embedding".to_string()]);
    }

    #[test]
    fn towers_are_wired_graphs_with_finetuners_names() {
        let files = tiny();
        let text = tower_model(&files, Tower::Text).unwrap();
        check_wiring(&text, &["input_ids", "attention_mask"]);
        let vision = tower_model(&files, Tower::Vision).unwrap();
        check_wiring(&vision, &["pixel_values"]);
        // Each block's Q, K and V go in as one product: 2 blocks, 2 towers.
        let g = text.graph.as_ref().unwrap();
        let qkv = g
            .initializer
            .iter()
            .filter(|t| t.name.ends_with("qkv.weight.T"))
            .count();
        assert_eq!(qkv, 2);
        // The file round-trips through protobuf.
        let bytes = text.encode_to_vec();
        assert_eq!(ModelProto::decode(bytes.as_slice()).unwrap(), text);
    }

    #[test]
    fn qkv_weights_are_the_three_projections_transposed_side_by_side() {
        let files = tiny();
        let m = tower_model(&files, Tower::Text).unwrap();
        let g = m.graph.unwrap();
        let t = g
            .initializer
            .iter()
            .find(|t| t.name == "text_model.encoder.layers.0.self_attn.qkv.weight.T")
            .unwrap();
        let vals: Vec<f32> = t
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let vb = files
            .var_builder(Towers::TEXT, DType::F32, &Device::Cpu)
            .unwrap();
        let p = vb.pp("text_model.encoder.layers.0.self_attn");
        let d = 32;
        let scale = (8f32).powf(-0.5);
        for (i, (part, s)) in [("q_proj", scale), ("k_proj", 1.0), ("v_proj", 1.0)]
            .into_iter()
            .enumerate()
        {
            let w: Vec<Vec<f32>> = p.pp(part).get((d, d), "weight").unwrap().to_vec2().unwrap();
            for (r, row) in vals.chunks_exact(3 * d).enumerate() {
                for o in 0..d {
                    // Row r of the transposed weight is input feature r.
                    assert_eq!(row[i * d + o], w[o][r] * s, "{part} [{o}, {r}]");
                }
            }
        }
    }

    #[test]
    fn towers_beyond_protobufs_limit_are_refused_by_name() {
        assert!(check_size(MAX_WEIGHT_BYTES, "m", Tower::Text).is_ok());
        let e = check_size(MAX_WEIGHT_BYTES + 1, "big-clip", Tower::Vision)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vision tower of big-clip") && e.contains("2 GiB"),
            "{e}"
        );
        // ViT-L/14's vision tower (303M parameters) is below it.
        assert!(check_size(303_000_000 * 4, "vit-l", Tower::Vision).is_ok());
        // From the config alone: ViT-B/32 passes; a ViT-H-sized vision tower (32 blocks of
        // 1280, MLP 5120: 630M parameters) does not.
        let vit_b: ClipConfig = ClipConfig::from_json_str("{}").unwrap();
        assert!(check_exportable(&vit_b, "b32").is_ok());
        let vit_h = ClipConfig::from_json_str(
            r#"{"vision_config": {"hidden_size": 1280, "intermediate_size": 5120,
                "num_hidden_layers": 32, "num_attention_heads": 16, "patch_size": 14}}"#,
        )
        .unwrap();
        let e = check_exportable(&vit_h, "h14").unwrap_err().to_string();
        assert!(e.contains("vision tower of h14"), "{e}");
        // What is measured: the initializers' bytes, weights and constants alike.
        let mut g = Graph::default();
        g.weight("w", &[2, 3], &[0.0; 6]);
        g.ints(&[1, 2]);
        assert_eq!(g.weight_bytes(), 24 + 16);
    }

    #[test]
    fn a_model_without_the_tower_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tiny");
        for f in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        // A standalone text-model config: the vision tower is not there.
        let mut text = cfg["text_config"].take();
        text["model_type"] = "clip_text_model".into();
        text["projection_dim"] = 32.into();
        std::fs::write(dir.path().join("config.json"), text.to_string()).unwrap();
        let files = ModelFiles::from_dir(dir.path()).unwrap();
        let e = tower_model(&files, Tower::Vision).unwrap_err().to_string();
        assert!(e.contains("has no vision tower"), "{e}");
        assert!(tower_model(&files, Tower::Text).is_ok());
    }
}
