//! Device and dtype choice for `--device` and `--dtype`.

use candle_core::{DType, Device};

use super::ModelError;

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`. `auto` takes GPU 0 when this build has CUDA and a
/// device answers, and the CPU otherwise.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let bad = |msg: String| ModelError::InvalidInput { msg };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => match Device::cuda_if_available(0) {
            Ok(d @ Device::Cuda(_)) => match gpu_supported(&d, "cuda:0") {
                Ok(()) => Ok(d),
                Err(msg) => {
                    tracing::warn!("{msg}; running on the CPU");
                    Ok(Device::Cpu)
                }
            },
            _ => Ok(Device::Cpu),
        },
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
            let d = Device::new_cuda(ordinal).map_err(|e| bad(format!("cannot open {s}: {e}")))?;
            gpu_supported(&d, s).map_err(bad)?;
            Ok(d)
        }
        other => Err(bad(format!(
            "unknown device {other:?}: use auto, cpu or cuda:N"
        ))),
    }
}

/// Whether this build's kernels (clipft's and candle's, compiled for one compute capability,
/// `CUDA_COMPUTE_CAP` at build time) run on the GPU `d`: the driver compiles their PTX for the
/// GPU at hand, which needs the GPU to be at least that capability. Said at start-up, instead
/// of a driver error at the first kernel.
fn gpu_supported(d: &Device, name: &str) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = d {
        let ctx = dev.cuda_stream().context().clone();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("cannot read {name}'s compute capability: {e}"))?;
        let gpu = ctx.name().unwrap_or_else(|_| "a GPU".into());
        let built = env!("CLIPFT_CUDA_CAP").parse::<u32>().unwrap_or(0);
        return check_capability(built, (major, minor), &format!("{name} ({gpu})"));
    }
    let _ = (d, name);
    Ok(())
}

/// The rule `parse_device` applies when it opens a GPU: the GPU's capability `(major, minor)` must reach the build's
/// (`built`, as `CUDA_COMPUTE_CAP` writes it: 90 for 9.0).
pub fn check_capability(built: u32, gpu: (i32, i32), what: &str) -> Result<(), String> {
    let have = (gpu.0.max(0) as u32) * 10 + gpu.1.max(0) as u32;
    if have >= built {
        return Ok(());
    }
    Err(format!(
        "{what} has compute capability {}.{}; this clipft's CUDA kernels were built for {}.{} \
         and need at least that: rebuild with `scripts/build-cuda.sh {have}` \
         (CUDA_COMPUTE_CAP={have}), or run with --device cpu",
        gpu.0,
        gpu.1,
        built / 10,
        built % 10
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_gpus_than_the_build_are_refused_clearly() {
        assert!(check_capability(90, (9, 0), "cuda:0").is_ok());
        assert!(check_capability(90, (10, 0), "cuda:0").is_ok());
        assert!(check_capability(80, (8, 6), "cuda:0").is_ok());
        let e = check_capability(90, (8, 0), "cuda:0 (NVIDIA A100)").unwrap_err();
        assert!(
            e.contains("compute capability 8.0")
                && e.contains("built for 9.0")
                && e.contains("scripts/build-cuda.sh 80"),
            "{e}"
        );
    }
}
