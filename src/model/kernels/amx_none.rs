//! Stand-in for the AMX kernels on targets other than x86-64: never available.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    Bf16x3,
}

pub struct PackedB {
    pub n: usize,
    pub k: usize,
}

impl PackedB {
    pub fn new(_w: &[f32], n: usize, k: usize, _with_lo: bool) -> Self {
        PackedB { n, k }
    }
    pub fn has_lo(&self) -> bool {
        false
    }
}

pub fn available() -> bool {
    false
}

pub fn matmul(_: &[f32], _: usize, _: &PackedB, _: &mut [f32], _: Precision, _: bool) {
    unreachable!("AMX is never available on this target")
}
