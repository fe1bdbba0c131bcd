//! The generated docarray v1 protobuf types (`proto/docarray.proto`), shared with the wire
//! protocol in [`crate::protocol`].

pub use crate::protocol::docarray::*;
