//! The wire: Jina's `jina.proto` and docarray v1's `docarray.proto` as generated types and gRPC
//! services, plus what the executor needs to read and write them without touching tensors
//! elsewhere: what a request costs decoded, checked before decoding ([`budget`]), the ndarray codec ([`ndarray`]), docarray access paths ([`paths`]) and request
//! parameters ([`params`]); and how peers connect, in the clear or over TLS ([`transport`]).

pub mod budget;
pub mod ndarray;
pub mod params;
pub mod paths;
pub mod transport;

/// docarray v1's document model (package `docarray`).
#[allow(clippy::all, missing_docs)]
pub mod docarray {
    include!(concat!(env!("OUT_DIR"), "/docarray.rs"));
}

/// Jina's request, status and service definitions (package `jina`). Jina's method names
/// (`stream_doc`, `_status`) are kept, hence the naming lint.
#[allow(clippy::all, missing_docs, non_camel_case_types)]
pub mod jina {
    include!(concat!(env!("OUT_DIR"), "/jina.rs"));
}

/// clipft's trainer service (package `clipft.trainer.v1`).
#[allow(clippy::all, missing_docs)]
pub mod trainer {
    include!(concat!(env!("OUT_DIR"), "/clipft.trainer.v1.rs"));
}

/// The encoded descriptor set of every proto file, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
