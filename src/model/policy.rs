//! Which kernels a loaded model runs, decided once and said once. The comparison switches
//! (`CLIPFT_NO_FUSED`: candle's ops instead of the fused CPU kernels, `CLIPFT_NO_FUSED_BLOCK`: the
//! per-op training graph instead of one op per block) are read from the environment once per
//! process, not on every call; [`KernelPolicy`] records, at load, what follows for a model from
//! its device, dtype, activations and the matmul precision, and the encoder logs it.

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
}

/// The process's switches, read once.
pub fn switches() -> Switches {
    static S: OnceLock<Switches> = OnceLock::new();
    *S.get_or_init(|| Switches {
        fused: std::env::var_os("CLIPFT_NO_FUSED").is_none(),
        fused_blocks: std::env::var_os("CLIPFT_NO_FUSED_BLOCK").is_none(),
    })
}

/// What a model was loaded to run on, and with which kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelPolicy {
    pub device: String,
    pub dtype: DType,
    /// Inference runs each block as the fused CPU passes of [`cpu`] (f32 on the CPU).
    pub fused_cpu: bool,
    /// How the fused path multiplies: "AMX bf16x3", "AMX bf16" or "f32".
    pub products: &'static str,
    pub text_activation: Option<Activation>,
    pub vision_activation: Option<Activation>,
}

impl KernelPolicy {
    /// The kernels `config`'s towers get on `device` in `dtype` under the current matmul
    /// precision.
    pub fn decide(device: &Device, dtype: DType, config: &ClipConfig) -> Self {
        let fused_cpu = device.is_cpu() && dtype == DType::F32 && switches().fused;
        let products = match (fused_cpu, cpu::amx_precision()) {
            (true, Some(super::amx::Precision::Bf16x3)) => "AMX bf16x3",
            (true, Some(super::amx::Precision::Bf16)) => "AMX bf16",
            _ => "f32",
        };
        Self {
            device: super::device::device_name(device),
            dtype,
            fused_cpu,
            products,
            text_activation: config.text.as_ref().map(|t| t.hidden_act),
            vision_activation: config.vision.as_ref().map(|v| v.hidden_act),
        }
    }
}

impl std::fmt::Display for KernelPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}: ", self.device, self.dtype)?;
        match self.fused_cpu {
            true => write!(f, "fused CPU blocks, products in {}", self.products)?,
            false => write!(f, "candle's ops")?,
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
        assert_eq!(cpu.fused_cpu, switches().fused);
        assert_eq!(cpu.text_activation, Some(Activation::Gelu));
        assert_eq!(cpu.vision_activation, Some(Activation::QuickGelu));
        let said = cpu.to_string();
        assert!(
            said.starts_with("cpu F32: ") && said.contains("text Gelu"),
            "{said}"
        );
        // Half precision on the CPU runs candle's ops, whatever the switches say.
        let half = KernelPolicy::decide(&Device::Cpu, DType::F16, &cfg);
        assert!(!half.fused_cpu && half.to_string().contains("candle's ops"));
    }
}
