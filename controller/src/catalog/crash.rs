//! Crash test: a writer process doing acknowledged catalog writes is killed
//! with SIGKILL at random moments; after each kill the catalog must reopen
//! with every acknowledged record present and intact, and stay writable.
//!
//! The writer is this test binary itself, re-executed with
//! `FERRY_CRASH_WRITER` set and filtered to the ignored `crash_writer` test.
//! It prints `ack <id> <token µs> <inventory µs>` after each write returned.
//!
//! Knobs: `FERRY_CRASH_ITERATIONS` (default 20), `FERRY_CRASH_SEED`,
//! `FERRY_CRASH_MAX_ACKS` (default 20); the sled engine runs with
//! `--features sled`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use super::conformance::{cluster, node, t, team};
use super::*;
use ferry_core::{
    Argv, Component, ComponentKind, ComponentState, HostComponent, HostPath, Volume, VolumeName,
};

const WRITER_ENV: &str = "FERRY_CRASH_WRITER";
const ENGINE_ENV: &str = "FERRY_CRASH_ENGINE";
const START_ENV: &str = "FERRY_CRASH_START";
const NODES: u64 = 3;
/// A writer stops by itself after this many records, should its parent die.
const WRITER_LIMIT: u64 = 100_000;

fn crash_cluster() -> ClusterName {
    cluster("crash")
}

fn digest(id: u64) -> String {
    TokenHash::of(&format!("payload-{id}")).to_hex()
}

fn node_of(id: u64) -> NodeName {
    node(&format!("n{}", id % NODES))
}

fn millis(id: u64) -> i64 {
    i64::try_from(id).expect("id fits i64")
}

/// The token written for `id`; its hash and expiry are derived from the id,
/// so any mix-up or torn value is detected.
fn token_for(id: u64) -> TokenRecord {
    let check = i64::from(u16::from_str_radix(&digest(id)[..4], 16).expect("hex"));
    TokenRecord::new(
        TokenHash::of(&format!("crash-{id}")),
        crash_cluster(),
        t(millis(id)),
        t(millis(id) + 1_000_000 + check),
    )
}

/// The inventory written for `id`: about 1.5 KiB of checksummed paths.
fn inventory_for(id: u64) -> App {
    let d = digest(id);
    let volumes: Vec<Volume> = (0..8)
        .map(|k| Volume {
            name: VolumeName::new(format!("v{k}-{}", &d[..16])).expect("volume name"),
            path: HostPath::new(format!("/data/{id}/{k}/{d}")).expect("volume path"),
        })
        .collect();
    App {
        name: AppName::new(format!("a{id}")).expect("app name"),
        team: team("crash"),
        components: vec![Component {
            state: ComponentState::Running,
            hooks: Default::default(),
            name: ComponentName::new(format!("c{id}")).expect("component name"),
            kind: ComponentKind::Host(HostComponent::Commands {
                start: Argv::new(vec!["/bin/start".into(), d.clone()]).expect("argv"),
                stop: Argv::new(vec!["/bin/stop".into(), id.to_string()]).expect("argv"),
                status: None,
            }),
            stateful: true,
            volumes: volumes.iter().map(|v| v.name.clone()).collect(),
            depends_on: vec![],
        }],
        volumes,
    }
}

fn engine_from_env() -> Engine {
    std::env::var(ENGINE_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_default()
}

/// The writer process. Does nothing unless started by `kill_loop`.
#[test]
#[ignore = "writer process for the crash test, started by it"]
fn crash_writer() {
    let Some(path) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let engine = engine_from_env();
    let start: u64 = std::env::var(START_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("FERRY_CRASH_START");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let catalog = open(engine, Path::new(&path)).await.expect("writer open");
        catalog
            .create_cluster(&crash_cluster(), t(0))
            .await
            .expect("writer cluster");
        let mut out = std::io::stdout().lock();
        for id in start..start + WRITER_LIMIT {
            let began = Instant::now();
            catalog
                .put_join_token(token_for(id))
                .await
                .expect("put token");
            let token_us = began.elapsed().as_micros();
            let began = Instant::now();
            catalog
                .replace_inventory(
                    &crash_cluster(),
                    &node_of(id),
                    vec![inventory_for(id)],
                    t(millis(id)),
                )
                .await
                .expect("replace inventory");
            let inv_us = began.elapsed().as_micros();
            if writeln!(out, "ack {id} {token_us} {inv_us}")
                .and_then(|()| out.flush())
                .is_err()
            {
                return;
            }
        }
    });
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [u128]) -> u128 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn percentile(v: &mut [u128], p: usize) -> u128 {
    v.sort_unstable();
    if v.is_empty() {
        return 0;
    }
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// Checks the reopened catalog against what the writers acknowledged.
async fn verify(
    catalog: &dyn Catalog,
    acked: &BTreeSet<u64>,
    in_flight: &BTreeSet<u64>,
    iteration: u64,
) -> usize {
    // Every token decodes (no corruption) and is one a writer attempted.
    let tokens = catalog
        .list_join_tokens(Some(&crash_cluster()))
        .await
        .unwrap_or_else(|e| panic!("iteration {iteration}: listing tokens failed: {e}"));
    let by_hash: BTreeMap<TokenHash, TokenRecord> =
        tokens.into_iter().map(|t| (t.hash, t)).collect();
    for id in acked {
        let want = token_for(*id);
        match by_hash.get(&want.hash) {
            Some(got) => assert_eq!(got, &want, "iteration {iteration}: token {id} altered"),
            None => panic!("iteration {iteration}: acknowledged token {id} lost"),
        }
    }
    for id in in_flight {
        let want = token_for(*id);
        if let Some(got) = by_hash.get(&want.hash) {
            assert_eq!(
                got, &want,
                "iteration {iteration}: in-flight token {id} torn"
            );
        }
    }
    let expected = acked.len()
        + in_flight
            .iter()
            .filter(|id| by_hash.contains_key(&token_for(**id).hash))
            .count();
    assert_eq!(
        by_hash.len(),
        expected,
        "iteration {iteration}: tokens present that no writer attempted"
    );

    // Each node holds the inventory of its latest acknowledged write, or of
    // the write in flight when the writer died, intact.
    let apps = catalog
        .list_apps(
            &AppFilter {
                cluster: Some(crash_cluster()),
                team: None,
            },
            &PageRequest::all(),
        )
        .await
        .unwrap_or_else(|e| panic!("iteration {iteration}: listing apps failed: {e}"))
        .items;
    let mut per_node: BTreeMap<NodeName, u64> = BTreeMap::new();
    for app in &apps {
        let id: u64 = app
            .app
            .name
            .as_str()
            .strip_prefix('a')
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("iteration {iteration}: unexpected app {}", app.app.name));
        assert!(
            acked.contains(&id) || in_flight.contains(&id),
            "iteration {iteration}: app {id} was never written"
        );
        assert_eq!(
            app.node,
            node_of(id),
            "iteration {iteration}: app {id} node"
        );
        assert_eq!(app.reported_at, t(millis(id)));
        assert_eq!(
            app.app,
            inventory_for(id),
            "iteration {iteration}: app {id} payload altered"
        );
        assert!(
            per_node.insert(app.node.clone(), id).is_none(),
            "iteration {iteration}: node {} holds two inventories",
            app.node
        );
    }
    for n in 0..NODES {
        let latest = acked.iter().rev().find(|id| *id % NODES == n);
        if let Some(latest) = latest {
            let held = per_node
                .get(&node(&format!("n{n}")))
                .unwrap_or_else(|| panic!("iteration {iteration}: inventory of n{n} lost"));
            assert!(
                held >= latest,
                "iteration {iteration}: node n{n} went back from app {latest} to {held}"
            );
        }
    }
    acked.len() + apps.len()
}

/// Runs the kill loop for one engine.
fn kill_loop(engine: Engine) {
    let iterations = env_u64("FERRY_CRASH_ITERATIONS", 20);
    let max_acks = env_u64("FERRY_CRASH_MAX_ACKS", 20);
    let seed = env_u64(
        "FERRY_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    ) | 1;
    eprintln!("crash test {engine}: seed {seed}, {iterations} iterations");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = conformance::store_path(dir.path(), engine);
    let exe = std::env::current_exe().expect("current exe");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let mut acked = BTreeSet::new();
    let mut in_flight = BTreeSet::new();
    let mut next_start = 0u64;
    let mut token_lat = Vec::new();
    let mut inv_lat = Vec::new();
    let mut open_lat = Vec::new();
    let mut records_verified = 0usize;
    let mut checked_in_use = false;

    for iteration in 0..iterations {
        let stderr_path = dir.path().join("writer.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "catalog::crash::crash_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(WRITER_ENV, &path)
            .env(ENGINE_ENV, engine.as_str())
            .env(START_ENV, next_start.to_string())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn writer");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let target = rng.next() % (max_acks + 1);
        let mut seen = 0u64;
        let mut last = next_start.checked_sub(1);
        let mut record = |line: &str, last: &mut Option<u64>| -> bool {
            let mut parts = line.split_whitespace();
            if parts.next() != Some("ack") {
                return false;
            }
            let id: u64 = parts.next().and_then(|s| s.parse().ok()).expect("ack id");
            let tok: u128 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .expect("ack token µs");
            let inv: u128 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .expect("ack inv µs");
            acked.insert(id);
            token_lat.push(tok);
            inv_lat.push(inv);
            *last = Some(id);
            true
        };
        let mut line = String::new();
        while seen < target {
            line.clear();
            let n = stdout.read_line(&mut line).expect("read writer stdout");
            if n == 0 {
                let mut err = String::new();
                let _ =
                    std::fs::File::open(&stderr_path).and_then(|mut f| f.read_to_string(&mut err));
                panic!("iteration {iteration}: writer exited early:\n{err}");
            }
            if line.ends_with('\n') && record(&line, &mut last) {
                seen += 1;
            }
        }
        if seen > 0 && !checked_in_use {
            // The live writer holds the catalog: a second process is refused.
            let err = match rt.block_on(open(engine, &path)) {
                Ok(_) => panic!("catalog opened while the writer process holds it"),
                Err(e) => e,
            };
            assert!(matches!(err, CatalogError::InUse { .. }), "{err}");
            checked_in_use = true;
        }
        child.kill().expect("SIGKILL writer");
        child.wait().expect("reap writer");
        // Acknowledgements already in the pipe count too; a torn last line
        // (no newline) does not.
        let mut rest = String::new();
        stdout
            .read_to_string(&mut rest)
            .expect("drain writer stdout");
        for l in rest.split_inclusive('\n') {
            if l.ends_with('\n') {
                record(l, &mut last);
            }
        }
        let attempted = last.map_or(next_start, |l| l + 1);
        in_flight.insert(attempted);
        next_start = attempted + 1;

        let began = Instant::now();
        let catalog = rt.block_on(conformance::open_when_free(engine, &path));
        open_lat.push(began.elapsed().as_micros());
        records_verified = rt.block_on(verify(&*catalog, &acked, &in_flight, iteration));
        // Still writable after the crash.
        let probe = team(&format!("probe-{iteration}"));
        rt.block_on(catalog.create_team(&probe, t(1)))
            .unwrap_or_else(|e| panic!("iteration {iteration}: write after crash failed: {e}"));
        let teams = rt.block_on(catalog.list_teams()).expect("list teams");
        assert!(teams.iter().any(|t| t.name == probe));
        drop(catalog);
    }
    eprintln!(
        "crash test {engine}: {iterations} kills, {} acknowledged writes, {records_verified} records verified at the end, 0 lost; \
         durable commit µs: token p50 {} p99 {}, inventory p50 {} p99 {}; reopen after kill µs: p50 {} max {}",
        acked.len(),
        median(&mut token_lat),
        percentile(&mut token_lat, 99),
        median(&mut inv_lat),
        percentile(&mut inv_lat, 99),
        median(&mut open_lat),
        open_lat.iter().max().copied().unwrap_or(0),
    );
}

#[test]
fn redb_keeps_acknowledged_writes_across_sigkill() {
    kill_loop(Engine::Redb);
}

#[cfg(feature = "sled")]
#[test]
fn sled_keeps_acknowledged_writes_across_sigkill() {
    kill_loop(Engine::Sled);
}
