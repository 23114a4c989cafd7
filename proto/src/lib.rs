//! Ferry's gRPC contract, generated from `proto/ferry/v1`, with the only
//! conversions between its messages and the ferry-core model
//! ([`convert`]) and the one mapping of error codes to gRPC ([`status`]).

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("ferry.v1");
}

pub mod convert;
pub mod identity;
pub mod status;
pub mod tls;
