//! Device and dtype choice for `--device` and `--dtype`.

use candle_core::{DType, Device};

use super::ModelError;

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`. `auto` takes GPU 0 when this build has CUDA and a
/// device answers, and the CPU otherwise.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let bad = |msg: String| ModelError::InvalidInput { msg };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| bad(format!("bad device {s:?}")))?,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(bad(format!(
                    "device {s} asked for, but this clipft was built without the `cuda` feature"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| bad(format!("cannot open {s}: {e}")))
        }
        other => Err(bad(format!(
            "unknown device {other:?}: use auto, cpu or cuda:N"
        ))),
    }
}

/// Parses `auto`, `f32`, `f16` or `bf16`; `auto` is f32 on the CPU (half precision is slower
/// there) and f16 on a GPU.
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType, ModelError> {
    match spec {
        "auto" => Ok(if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        }),
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(ModelError::InvalidInput {
            msg: format!("unknown dtype {other:?}: use auto, f32, f16 or bf16"),
        }),
    }
}

/// A short human name, for logs and bench output.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => format!("cuda:{}", device.location_ordinal()),
        Device::Metal(_) => "metal".into(),
    }
}

trait Ordinal {
    fn location_ordinal(&self) -> usize;
}

impl Ordinal for Device {
    fn location_ordinal(&self) -> usize {
        match self.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
            _ => 0,
        }
    }
}
