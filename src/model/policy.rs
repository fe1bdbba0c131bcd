//! Which kernels a model runs, decided once when it is built and carried by its layers. The
//! comparison switches (`CLIPFT_NO_FUSED`: candle's ops instead of the fused CPU kernels,
//! `CLIPFT_NO_FUSED_BLOCK`: the per-op training graph instead of one op per block) are read from
//! the environment once per process, as is `CLIPFT_NO_PACKED_TEXT` (captions padded to the
//! batch's longest instead of packed up to their end-of-text tokens), `CLIPFT_NO_TC_ATTENTION`
//! (the GPU path's attention on CUDA cores only), `CLIPFT_NO_RESIDUAL_NORM` (the GPU path's
//! residual add and layer norm as two kernels in inference), `CLIPFT_NO_MULTI_TENSOR_ADAM`
//! (the GPU's optimiser step and gradient norm launched per parameter) and
//! `CLIPFT_NO_FUSED_EMBED` (the GPU path's embeddings as candle's gathers, concatenation and
//! adds). [`Kernels`] is what follows for one model from its device,
//! dtype, those switches and the matmul precision: [`super::Clip::new`] takes it and every layer
//! keeps a copy, so no layer looks at tensors, globals or the environment to choose a path.
//! [`KernelPolicy`] adds what a loaded model's log line and the executor's banner say.

use std::sync::OnceLock;

use candle_core::{DType, Device};

use super::config::{Activation, ClipConfig};
use super::cpu;

/// The switches that turn fused kernels off, for comparisons and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    /// The fused CPU kernels (inference blocks, training ops).
    pub fused: bool,
    /// The whole-block and embedding training ops.
    pub fused_blocks: bool,
    /// Packed captions where the kernels take them.
    pub packed_text: bool,
    /// The GPU path's f16/bf16 attention, forward and backward, on tensor cores.
    pub tc_attention: bool,
    /// The GPU path's residual add and layer norm as one kernel in inference.
    pub residual_norm: bool,
    /// The GPU's optimiser step, and the gradients' sum of squares, as one launch over every
    /// parameter (otherwise one or more per parameter, and the compute copies cast after it).
    pub multi_tensor_adam: bool,
    /// The GPU path's embeddings as one op per tower.
    pub embed: bool,
}

/// The process's switches, read once.
pub fn switches() -> Switches {
    static S: OnceLock<Switches> = OnceLock::new();
    *S.get_or_init(|| Switches {
        fused: std::env::var_os("CLIPFT_NO_FUSED").is_none(),
        fused_blocks: std::env::var_os("CLIPFT_NO_FUSED_BLOCK").is_none(),
        packed_text: std::env::var_os("CLIPFT_NO_PACKED_TEXT").is_none(),
        tc_attention: std::env::var_os("CLIPFT_NO_TC_ATTENTION").is_none(),
        residual_norm: std::env::var_os("CLIPFT_NO_RESIDUAL_NORM").is_none(),
        multi_tensor_adam: std::env::var_os("CLIPFT_NO_MULTI_TENSOR_ADAM").is_none(),
        embed: std::env::var_os("CLIPFT_NO_FUSED_EMBED").is_none(),
    })
}

/// The kernel choices every layer of one model follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// f32 on the CPU with the fused kernels on: inference runs each block as [`cpu`]'s fused
    /// passes, training runs the fused ops of [`super::train_ops`] (layer norm, linear,
    /// attention, activation, softmax with their own backward). Otherwise candle's ops.
    pub fused_cpu: bool,
    /// With `fused_cpu`: a training pass runs each encoder block, and each tower's embeddings,
    /// as one op ([`super::train_block`], [`super::train_embed`]). With `fused_gpu`: each
    /// encoder block as one node over the GPU path's ops ([`super::ops::gpu_block`]).
    /// `CLIPFT_NO_FUSED_BLOCK` turns both off.
    pub train_blocks: bool,
    /// With `fused_cpu`: f32 products on Intel AMX in this precision; None keeps plain f32.
    pub amx: Option<super::amx::Precision>,
    /// On a GPU: inference and training through clipft's CUDA kernels, each op with its
    /// backward: attention as one op over the stacked QKV projection
    /// ([`super::ops::fused_attention`], where the head width allows), layer norm in training
    /// ([`super::ops::fused_norm`]; inference keeps candle's fused kernel where `residual_norm`
    /// does not apply), each linear layer's bias + activation or bias + residual as one op
    /// ([`super::ops::fused_tail`]), and the last block on the pooled rows only.
    pub fused_gpu: bool,
    /// With `fused_cpu` or `fused_gpu`: the text tower computes each caption only up to its
    /// end-of-text token, the captions packed end to end ([`super::kernels::seqs`]), where every
    /// attention layer runs clipft's kernels (which take packed sequences).
    pub packed_text: bool,
    /// With `fused_gpu`: the attention forward and backward in f16 and bf16 on tensor cores
    /// (wmma) where the head width is 64 and sequences have at most 128 rows; the CUDA-core
    /// kernels otherwise (`CLIPFT_NO_TC_ATTENTION=1`: always).
    pub tc_attention: bool,
    /// With `fused_gpu`, in inference: each residual add and the layer norm after it as one
    /// kernel ([`super::ops::fused_norm::ResidualNorm`]); two otherwise
    /// (`CLIPFT_NO_RESIDUAL_NORM=1`).
    pub residual_norm: bool,
    /// With `fused_gpu`: each tower's embedding as one op ([`super::ops::embed`]): token +
    /// position rows, and the class token + positions over the patch product (with the
    /// pre-layer-norm in inference); candle's gathers, concatenation and adds otherwise
    /// (`CLIPFT_NO_FUSED_EMBED=1`).
    pub embed: bool,
}

impl Kernels {
    /// Whether a training pass runs the CPU's whole-block and embedding ops
    /// ([`super::train_block`], [`super::train_embed`]), which have no GPU form.
    pub fn cpu_train_blocks(&self) -> bool {
        self.fused_cpu && self.train_blocks
    }

    /// Whether a training pass runs each encoder block as one node over the GPU path's ops
    /// ([`super::ops::gpu_block`]).
    pub fn gpu_train_blocks(&self) -> bool {
        self.fused_gpu && self.train_blocks
    }

    /// candle's ops only: what a model on a GPU or in half precision runs.
    pub const CANDLE: Self = Self {
        fused_cpu: false,
        train_blocks: false,
        amx: None,
        fused_gpu: false,
        packed_text: false,
        tc_attention: false,
        residual_norm: false,
        embed: false,
    };

    /// The kernels for weights on `device` in `dtype`, under the process's switches and matmul
    /// precision (`--matmul-precision`, set before models are built).
    pub fn decide(device: &Device, dtype: DType) -> Self {
        let sw = switches();
        if device.is_cuda() && sw.fused {
            return Self {
                fused_gpu: true,
                train_blocks: sw.fused_blocks,
                packed_text: sw.packed_text,
                tc_attention: sw.tc_attention,
                residual_norm: sw.residual_norm,
                embed: sw.embed,
                ..Self::CANDLE
            };
        }
        if !(device.is_cpu() && dtype == DType::F32 && sw.fused) {
            return Self::CANDLE;
        }
        Self {
            fused_cpu: true,
            train_blocks: sw.fused_blocks,
            amx: cpu::amx_precision(),
            fused_gpu: false,
            packed_text: sw.packed_text,
            tc_attention: false,
            residual_norm: false,
            embed: false,
        }
    }
}

/// What a model was loaded to run on, and with which kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelPolicy {
    pub device: String,
    pub dtype: DType,
    pub kernels: Kernels,
    /// How the fused path multiplies: "AMX bf16x3", "AMX bf16" or "f32".
    pub products: &'static str,
    pub text_activation: Option<Activation>,
    pub vision_activation: Option<Activation>,
}

impl KernelPolicy {
    /// The kernels `config`'s towers get on `device` in `dtype` under the current matmul
    /// precision.
    pub fn decide(device: &Device, dtype: DType, config: &ClipConfig) -> Self {
        let kernels = Kernels::decide(device, dtype);
        let products = match kernels.amx {
            Some(super::amx::Precision::Bf16x3) => "AMX bf16x3",
            Some(super::amx::Precision::Bf16) => "AMX bf16",
            None => "f32",
        };
        Self {
            device: super::device::device_name(device),
            dtype,
            kernels,
            products,
            text_activation: config.text.as_ref().map(|t| t.hidden_act),
            vision_activation: config.vision.as_ref().map(|v| v.hidden_act),
        }
    }
}

impl std::fmt::Display for KernelPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}: ", self.device, self.dtype)?;
        match (self.kernels.fused_cpu, self.kernels.fused_gpu) {
            (true, _) => write!(f, "fused CPU blocks, products in {}", self.products)?,
            (false, true) => {
                write!(
                    f,
                    "CUDA kernels: attention on stacked QKV, layer norm, linear tails"
                )?;
                if self.kernels.embed {
                    write!(f, ", embeddings")?;
                }
                write!(f, "; candle's GEMMs")?;
            }
            (false, false) => write!(f, "candle's ops")?,
        }
        if self.kernels.packed_text && self.text_activation.is_some() {
            write!(f, ", packed captions")?;
        }
        for (tower, act) in [
            ("text", self.text_activation),
            ("vision", self.vision_activation),
        ] {
            if let Some(a) = act {
                write!(f, ", {tower} {a:?}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decided_from_device_dtype_and_activations() {
        let cfg = ClipConfig::from_json_str(
            r#"{"text_config":{"hidden_act":"gelu"},"vision_config":{}}"#,
        )
        .unwrap();
        let cpu = KernelPolicy::decide(&Device::Cpu, DType::F32, &cfg);
        assert_eq!(cpu.kernels.fused_cpu, switches().fused);
        assert_eq!(cpu.text_activation, Some(Activation::Gelu));
        assert_eq!(cpu.vision_activation, Some(Activation::QuickGelu));
        let said = cpu.to_string();
        assert!(
            said.starts_with("cpu F32: ") && said.contains("text Gelu"),
            "{said}"
        );
        // Half precision on the CPU runs candle's ops, whatever the switches say.
        let half = KernelPolicy::decide(&Device::Cpu, DType::F16, &cfg);
        assert!(!half.kernels.fused_cpu && half.to_string().contains("candle's ops"));
        assert_eq!(half.kernels, Kernels::CANDLE);
    }
}
