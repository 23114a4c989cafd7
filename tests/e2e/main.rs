//! End-to-end tests over the real binaries.

mod connections;
mod containers;
mod ferryctl;
mod files;
mod foundation;
mod jobs;
mod journal;
mod link;
mod postgres;
mod rebuild;
mod reconnect;
mod storage;
