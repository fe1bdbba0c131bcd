//! docarray v1's `NdArrayProto` codec: embeddings out, image tensors in. docarray writes numpy
//! arrays as raw C-order bytes with numpy's dtype string (`<f4` for float32), shape and
//! `cls_name`; that is all a Python peer needs to rebuild the array.

use super::docarray::{nd_array_proto, DenseNdArrayProto, NdArrayProto};

/// An embedding as docarray writes a float32 numpy vector: `dense{buffer <f4 LE, shape [D],
/// dtype "<f4"}, cls_name "numpy"`.
pub fn embedding(values: &[f32]) -> NdArrayProto {
    let mut buffer = Vec::with_capacity(values.len() * 4);
    for v in values {
        buffer.extend_from_slice(&v.to_le_bytes());
    }
    numpy(buffer, vec![values.len() as u32], "<f4")
}

/// A dense numpy array as docarray writes it: raw C-order bytes, shape and numpy's dtype string.
pub fn numpy(buffer: Vec<u8>, shape: Vec<u32>, dtype: &str) -> NdArrayProto {
    NdArrayProto {
        content: Some(nd_array_proto::Content::Dense(DenseNdArrayProto {
            buffer: buffer.into(),
            shape,
            dtype: dtype.into(),
        })),
        cls_name: "numpy".into(),
        parameters: None,
    }
}

/// A dense array read back as float32 (for tests and clients; `<f4`, `<f2`, `<f8` accepted).
pub fn to_f32(t: &NdArrayProto) -> Result<(Vec<f32>, Vec<usize>), String> {
    let d = dense(t)?;
    let shape: Vec<usize> = d.shape.iter().map(|s| *s as usize).collect();
    let values: Vec<f32> = match d.dtype.as_str() {
        "<f4" | "float32" => d
            .buffer
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        "<f2" | "float16" => d
            .buffer
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        "<f8" | "float64" => d.buffer.chunks_exact(8).map(|b| f64_le(b) as f32).collect(),
        other => return Err(format!("dtype {other:?} is not a float array")),
    };
    check_len(values.len(), &shape)?;
    Ok((values, shape))
}

/// An image given as a tensor: `[H, W]` or `[H, W, C]` (C = 1, 3 or 4), uint8, or float
/// values on the 0..255 scale, which are clipped and truncated to uint8 as numpy's
/// `astype(uint8)` does for in-range values. Returns the HWC bytes with height, width, channels.
pub fn image_pixels(t: &NdArrayProto) -> Result<(Vec<u8>, usize, usize, usize), String> {
    let d = dense(t)?;
    let shape: Vec<usize> = d.shape.iter().map(|s| *s as usize).collect();
    let (height, width, channels) = match shape[..] {
        [h, w] => (h, w, 1),
        [h, w, c] if matches!(c, 1 | 3 | 4) => (h, w, c),
        _ => {
            return Err(format!(
                "image tensor of shape {shape:?}; expected [H, W] or [H, W, C] with C = 1, 3 or 4"
            ))
        }
    };
    let to_u8 = |v: f64| v.clamp(0.0, 255.0) as u8;
    let data: Vec<u8> = match d.dtype.as_str() {
        "|u1" | "u1" | "uint8" => d.buffer.to_vec(),
        "<f4" | "float32" => d
            .buffer
            .chunks_exact(4)
            .map(|b| to_u8(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64))
            .collect(),
        "<f2" | "float16" => d
            .buffer
            .chunks_exact(2)
            .map(|b| to_u8(half::f16::from_le_bytes([b[0], b[1]]).to_f64()))
            .collect(),
        "<f8" | "float64" => d.buffer.chunks_exact(8).map(|b| to_u8(f64_le(b))).collect(),
        other => {
            return Err(format!(
                "image tensor dtype {other:?} is not supported (|u1, <f2, <f4 and <f8 are)"
            ))
        }
    };
    check_len(data.len(), &shape)?;
    Ok((data, height, width, channels))
}

fn dense(t: &NdArrayProto) -> Result<&DenseNdArrayProto, String> {
    match &t.content {
        Some(nd_array_proto::Content::Dense(d)) => Ok(d),
        Some(nd_array_proto::Content::Sparse(_)) => Err("sparse arrays are not supported".into()),
        None => Err("the array has no data".into()),
    }
}

fn f64_le(b: &[u8]) -> f64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    f64::from_le_bytes(a)
}

fn check_len(n: usize, shape: &[usize]) -> Result<(), String> {
    let want = shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
    if want != Some(n) {
        return Err(format!("the buffer holds {n} values for shape {shape:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_round_trips() -> Result<(), String> {
        let e = embedding(&[1.0, -2.5, 3.25]);
        assert_eq!(e.cls_name, "numpy");
        let (v, shape) = to_f32(&e)?;
        assert_eq!(v, vec![1.0, -2.5, 3.25]);
        assert_eq!(shape, vec![3]);
        Ok(())
    }

    #[test]
    fn image_tensors_by_dtype() -> Result<(), String> {
        let (d, h, w, c) = image_pixels(&numpy(vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3], "|u1"))?;
        assert_eq!((d, h, w, c), (vec![1, 2, 3, 4, 5, 6], 1, 2, 3));
        let f: Vec<u8> = [0.0f32, 254.9, 300.0, -4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let (d, ..) = image_pixels(&numpy(f, vec![2, 2], "<f4"))?;
        assert_eq!(d, vec![0, 254, 255, 0]);
        assert!(image_pixels(&numpy(vec![0; 8], vec![2, 2], "<i2"))
            .unwrap_err()
            .contains("dtype"));
        assert!(image_pixels(&numpy(vec![0; 5], vec![2, 2], "|u1"))
            .unwrap_err()
            .contains("5 values"));
        assert!(image_pixels(&numpy(vec![0; 10], vec![1, 2, 5], "|u1")).is_err());
        Ok(())
    }
}
