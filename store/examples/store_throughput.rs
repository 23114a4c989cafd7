//! Measures put/get throughput of a storage location (a benchmark, not a
//! test).
//!
//! ```sh
//! cargo run --release -p ferry-agent --example store_throughput -- LOCATION [COUNT] [MIB] [PARALLEL]
//! # e.g. local:/tmp/ferry-bench  or  s3:http://127.0.0.1:8333/bench
//! # S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
//! ```

use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use ferry_store::{ObjectKey, StorageConfig, open};
use futures::{StreamExt, TryStreamExt};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let location: StorageConfig = args
        .next()
        .context("usage: store_throughput LOCATION [COUNT] [MIB] [PARALLEL]")?
        .parse()?;
    let count: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let mib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    let parallel: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    if let StorageConfig::S3(s3) = &location {
        ferry_store::S3Store::new(s3).await?.create_bucket().await?;
    }
    let store = open(&location).await?;

    // Incompressible data, distinct per object.
    let objects: Vec<(ObjectKey, Bytes)> = (0..count)
        .map(|i| {
            let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut data = Vec::with_capacity(mib << 20);
            while data.len() < mib << 20 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.extend_from_slice(&x.to_le_bytes());
            }
            Ok((ObjectKey::new(format!("bench/{i:04}"))?, Bytes::from(data)))
        })
        .collect::<Result<_>>()?;
    let total = (count * (mib << 20)) as f64 / (1 << 20) as f64;

    let start = Instant::now();
    futures::stream::iter(objects.iter().cloned())
        .map(|(k, d)| {
            let store = store.clone();
            async move { store.put(&k, d).await }
        })
        .buffer_unordered(parallel)
        .try_collect::<Vec<_>>()
        .await?;
    let put = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let sizes: Vec<usize> = futures::stream::iter(objects.iter().map(|(k, _)| k.clone()))
        .map(|k| {
            let store = store.clone();
            async move { store.get(&k).await.map(|b| b.len()) }
        })
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
    let get = start.elapsed().as_secs_f64();
    anyhow::ensure!(sizes.iter().all(|s| *s == mib << 20), "short read");

    for (k, _) in &objects {
        store.delete(k).await?;
    }
    println!(
        "{location}: {count} x {mib} MiB, {parallel} in parallel: put {:.0} MiB/s ({put:.2} s), get {:.0} MiB/s ({get:.2} s)",
        total / put,
        total / get
    );
    Ok(())
}
