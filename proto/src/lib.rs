//! Ferry's gRPC contract, generated from `proto/ferry/v1`.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("ferry.v1");
}

pub mod identity;
pub mod report;
pub mod tls;
