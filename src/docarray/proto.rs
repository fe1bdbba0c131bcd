//! The generated docarray v1 protobuf types (`proto/docarray.proto`) and the ndarray codec.

#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/docarray.rs"));
