//! The conformance suite every [`Catalog`] engine must pass.
//!
//! Each check is written once against `Arc<dyn Catalog>`; the macro at the
//! bottom instantiates the whole suite per engine (sled only with the
//! `sled` feature).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::store::{FORMAT_VERSION, Table};
use super::*;
use ferry_core::{
    Argv, CodedError, Component, ComponentKind, ComponentState, ErrorCode, HostComponent, HostPath,
    UnitName, Volume, VolumeName,
};

pub(crate) fn t(ms: i64) -> Timestamp {
    Timestamp::from_unix_millis(ms)
}

pub(crate) fn cluster(s: &str) -> ClusterName {
    ClusterName::new(s).expect("test cluster name")
}

pub(crate) fn node(s: &str) -> NodeName {
    NodeName::new(s).expect("test node name")
}

pub(crate) fn team(s: &str) -> TeamName {
    TeamName::new(s).expect("test team name")
}

fn agent_id(s: &str) -> AgentId {
    AgentId::new(s).expect("test agent id")
}

/// Where an engine keeps the catalog inside a test directory.
pub(crate) fn store_path(dir: &Path, engine: Engine) -> PathBuf {
    dir.join(format!("catalog.{engine}"))
}

/// Opens the catalog, waiting (bounded) for a previous handle in this
/// process to release its lock, in case an engine releases it late.
pub(crate) async fn open_when_free(engine: Engine, path: &Path) -> Arc<dyn Catalog> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match open(engine, path).await {
            Ok(c) => return c,
            Err(CatalogError::InUse { .. }) if Instant::now() < deadline => {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("opening {engine} catalog at {}: {e}", path.display()),
        }
    }
}

/// Writes raw bytes under a key, bypassing the catalog rules, to plant
/// records a newer Ferry could have written.
fn plant(engine: Engine, path: &Path, table: Table, key: &str, bytes: &[u8]) {
    fn put<K: store::Kv>(kv: &K, table: Table, key: &str, bytes: &[u8]) {
        kv.write("plant", &|tx| tx.put(table, key, bytes))
            .expect("plant raw record");
    }
    match engine {
        Engine::Redb => {
            let c = redb::RedbKv::open(path).expect("open redb");
            put(c.kv(), table, key, bytes);
        }
        #[cfg(feature = "sled")]
        Engine::Sled => {
            let deadline = Instant::now() + Duration::from_secs(20);
            let c = loop {
                match sled::SledKv::open(path) {
                    Ok(c) => break c,
                    Err(CatalogError::InUse { .. }) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("open sled: {e}"),
                }
            };
            put(c.kv(), table, key, bytes);
        }
        #[cfg(not(feature = "sled"))]
        Engine::Sled => panic!("sled engine not built"),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    engine: Engine,
    catalog: Arc<dyn Catalog>,
}

async fn fixture(engine: Engine) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = store_path(dir.path(), engine);
    let catalog = open_when_free(engine, &path).await;
    Fixture {
        _dir: dir,
        path,
        engine,
        catalog,
    }
}

fn agent(id: &str, c: &str, n: &str, at: i64) -> AgentRecord {
    AgentRecord {
        id: agent_id(id),
        cluster: cluster(c),
        node: node(n),
        version: "0.1.0".into(),
        platform: "host".into(),
        restores: vec!["host".into()],
        enrolled_at: t(at),
        last_seen: t(at),
        cert_serial: format!("{id}-serial"),
        cert_fingerprint: format!("{id}-fp"),
    }
}

fn app(name: &str, tm: &str, vol: &str) -> App {
    let volume = VolumeName::new(vol).expect("volume name");
    App {
        name: AppName::new(name).expect("app name"),
        team: team(tm),
        volumes: vec![Volume {
            name: volume.clone(),
            path: HostPath::new(vol).expect("volume path"),
        }],
        components: vec![
            Component {
                state: ComponentState::Running,
                hooks: Default::default(),
                name: ComponentName::new("postgresql@15-main.service").expect("component"),
                kind: ComponentKind::Host(HostComponent::Systemd {
                    unit: UnitName::new("postgresql@15-main.service").expect("unit"),
                }),
                stateful: true,
                volumes: vec![volume],
                depends_on: vec![],
            },
            Component {
                state: ComponentState::Running,
                hooks: Default::default(),
                name: ComponentName::new("web").expect("component"),
                kind: ComponentKind::Host(HostComponent::Commands {
                    start: Argv::new(vec!["/usr/bin/web".into(), "--serve".into()]).expect("argv"),
                    stop: Argv::new(vec!["/usr/bin/pkill".into(), "-x".into(), "web".into()])
                        .expect("argv"),
                    status: None,
                }),
                stateful: false,
                volumes: vec![],
                depends_on: vec![
                    ComponentName::new("postgresql@15-main.service").expect("component"),
                ],
            },
        ],
    }
}

pub(crate) async fn clusters_are_idempotent(engine: Engine) {
    let f = fixture(engine).await;
    let c = &f.catalog;
    assert!(
        c.list_clusters(&PageRequest::all())
            .await
            .expect("list")
            .items
            .is_empty()
    );
    let first = c
        .create_cluster(&cluster("prod"), t(10))
        .await
        .expect("create");
    assert_eq!(first.created_at, t(10));
    let again = c
        .create_cluster(&cluster("prod"), t(99))
        .await
        .expect("create again");
    assert_eq!(again, first, "second create returns the original record");
    c.create_cluster(&cluster("dev"), t(20))
        .await
        .expect("create dev");
    let names: Vec<_> = c
        .list_clusters(&PageRequest::all())
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(names, ["dev", "prod"]);
    assert_eq!(
        c.get_cluster(&cluster("prod")).await.expect("get"),
        Some(first)
    );
    assert_eq!(c.get_cluster(&cluster("nope")).await.expect("get"), None);
}

pub(crate) async fn teams_are_idempotent(engine: Engine) {
    let f = fixture(engine).await;
    let c = &f.catalog;
    let a = c.create_team(&team("web"), t(1)).await.expect("create");
    assert_eq!(c.create_team(&team("web"), t(2)).await.expect("again"), a);
    c.create_team(&team("data"), t(3)).await.expect("create");
    let teams = c.list_teams().await.expect("list");
    assert_eq!(teams.len(), 2);
    assert_eq!(teams[0].name, team("data"));
    assert_eq!(teams[1], a);
}

pub(crate) async fn join_tokens_are_single_use_and_expire(engine: Engine) {
    let f = fixture(engine).await;
    let c = &f.catalog;
    let prod = cluster("prod");
    let hash = TokenHash::of("s3cret-token");
    let orphan = TokenRecord::new(hash, cluster("nope"), t(0), t(1000));
    let err = c.put_join_token(orphan).await.expect_err("unknown cluster");
    assert!(matches!(err, CatalogError::ClusterNotFound { .. }), "{err}");

    c.create_cluster(&prod, t(0)).await.expect("cluster");
    let rec = TokenRecord::new(hash, prod.clone(), t(0), t(1000));
    c.put_join_token(rec.clone()).await.expect("put");
    let err = c.put_join_token(rec.clone()).await.expect_err("duplicate");
    assert!(matches!(err, CatalogError::TokenExists { .. }), "{err}");

    let n1 = node("n1");
    let err = c
        .consume_join_token(&TokenHash::of("wrong"), t(5), &n1)
        .await
        .expect_err("unknown");
    assert!(matches!(err, CatalogError::TokenUnknown { .. }), "{err}");
    assert!(!err.is_transient());

    let err = c
        .consume_join_token(&hash, t(1000), &n1)
        .await
        .expect_err("expired at the deadline");
    assert!(matches!(err, CatalogError::TokenExpired { .. }), "{err}");
    assert!(
        err.to_string().contains("expired at 1970-01-01T00:00:01Z"),
        "{err}"
    );
    let stored = c.list_join_tokens(None).await.expect("list");
    assert_eq!(
        stored,
        vec![rec.clone()],
        "a failed consume changes nothing"
    );

    assert_eq!(
        c.consume_join_token(&hash, t(999), &n1)
            .await
            .expect("consume"),
        prod
    );
    let err = c
        .consume_join_token(&hash, t(999), &node("n2"))
        .await
        .expect_err("second use");
    match &err {
        CatalogError::TokenUsed { node, at, .. } => {
            assert_eq!(node, &n1);
            assert_eq!(*at, t(999));
        }
        other => panic!("expected TokenUsed, got {other}"),
    }
    assert!(!err.to_string().contains("s3cret"), "{err}");

    let listed = c.list_join_tokens(Some(&prod)).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].used,
        Some(TokenUse {
            at: t(999),
            node: n1.clone()
        })
    );
    assert!(
        c.list_join_tokens(Some(&cluster("dev")))
            .await
            .expect("list")
            .is_empty()
    );
    assert!(c.remove_join_token(&hash).await.expect("remove"));
    assert!(!c.remove_join_token(&hash).await.expect("remove again"));
    assert!(c.list_join_tokens(None).await.expect("list").is_empty());
}

pub(crate) async fn concurrent_consumers_have_one_winner(engine: Engine) {
    let f = fixture(engine).await;
    let c = &f.catalog;
    let prod = cluster("prod");
    c.create_cluster(&prod, t(0)).await.expect("cluster");
    for round in 0..5 {
        let hash = TokenHash::of(&format!("race-{round}"));
        c.put_join_token(TokenRecord::new(hash, prod.clone(), t(0), t(1_000_000)))
            .await
            .expect("put");
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..32 {
            let c = Arc::clone(c);
            let barrier = Arc::clone(&barrier);
            tasks.spawn(async move {
                barrier.wait().await;
                let n = node(&format!("racer-{i}"));
                (n.clone(), c.consume_join_token(&hash, t(10), &n).await)
            });
        }
        let mut winners = Vec::new();
        let mut used = 0;
        while let Some(joined) = tasks.join_next().await {
            let (n, result) = joined.expect("task");
            match result {
                Ok(cl) => {
                    assert_eq!(cl, prod);
                    winners.push(n);
                }
                Err(CatalogError::TokenUsed { .. }) => used += 1,
                Err(e) => panic!("unexpected error in race: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one winner");
        assert_eq!(used, 31);
        let stored = c.list_join_tokens(None).await.expect("list");
        let token = stored.iter().find(|t| t.hash == hash).expect("token kept");
        assert_eq!(
            token.used.as_ref().map(|u| &u.node),
            Some(&winners[0]),
            "the stored user is the winner"
        );
    }
}

pub(crate) async fn agents_enrol_touch_and_leave(engine: Engine) {
    let f = fixture(engine).await;
    let c = &f.catalog;
    let err = c
        .upsert_agent(agent("a1", "prod", "n1", 100))
        .await
        .expect_err("unknown cluster");
    assert!(matches!(err, CatalogError::ClusterNotFound { .. }), "{err}");
    c.create_cluster(&cluster("prod"), t(0))
        .await
        .expect("cluster");
    c.create_cluster(&cluster("dev"), t(0))
        .await
        .expect("cluster");
    c.upsert_agent(agent("a1", "prod", "n1", 100))
        .await
        .expect("a1");
    c.upsert_agent(agent("a2", "prod", "n2", 100))
        .await
        .expect("a2");
    c.upsert_agent(agent("a3", "dev", "n1", 100))
        .await
        .expect("a3");

    c.touch_agent(&agent_id("a1"), t(500)).await.expect("touch");
    c.touch_agent(&agent_id("a1"), t(300))
        .await
        .expect("older touch");
    let a1 = c
        .get_agent(&agent_id("a1"))
        .await
        .expect("get")
        .expect("a1");
    assert_eq!(a1.last_seen, t(500), "last_seen never moves backwards");
    assert_eq!(a1.enrolled_at, t(100));

    let err = c
        .touch_agents(&[(agent_id("a2"), t(900)), (agent_id("ghost"), t(900))])
        .await
        .expect_err("unknown agent in batch");
    assert!(matches!(err, CatalogError::AgentNotFound { .. }), "{err}");
    let a2 = c
        .get_agent(&agent_id("a2"))
        .await
        .expect("get")
        .expect("a2");
    assert_eq!(a2.last_seen, t(100), "a failed batch changes nothing");
    c.touch_agents(&[(agent_id("a2"), t(900)), (agent_id("a3"), t(901))])
        .await
        .expect("batch");
    assert_eq!(
        c.get_agent(&agent_id("a3"))
            .await
            .expect("get")
            .expect("a3")
            .last_seen,
        t(901)
    );

    let prod_agents = c
        .list_agents(Some(&cluster("prod")), &PageRequest::all())
        .await
        .expect("list")
        .items;
    let ids: Vec<_> = prod_agents.iter().map(|a| a.id.to_string()).collect();
    assert_eq!(ids, ["a1", "a2"]);
    assert_eq!(
        c.list_agents(None, &PageRequest::all())
            .await
            .expect("list")
            .items
            .len(),
        3
    );

    // The same id may not move to another node.
    let err = c
        .upsert_agent(agent("a1", "prod", "n9", 100))
        .await
        .expect_err("moved agent");
    assert!(matches!(err, CatalogError::AgentConflict { .. }), "{err}");

    // A node that re-enrols replaces its old agent and keeps its inventory.
    c.replace_inventory(
        &cluster("prod"),
        &node("n1"),
        vec![app("shop", "web", "/srv/shop")],
        t(600),
    )
    .await
    .expect("inventory");
    c.upsert_agent(agent("a9", "prod", "n1", 700))
        .await
        .expect("re-enrol");
    assert_eq!(c.get_agent(&agent_id("a1")).await.expect("get"), None);
    assert_eq!(
        c.list_agents(Some(&cluster("prod")), &PageRequest::all())
            .await
            .expect("list")
            .items
            .len(),
        2
    );
    assert_eq!(
        c.list_apps(&AppFilter::default(), &PageRequest::all())
            .await
            .expect("apps")
            .items
            .len(),
        1
    );

    // Removing the agent removes what its node reported.
    assert!(c.remove_agent(&agent_id("a9")).await.expect("remove"));
    assert!(!c.remove_agent(&agent_id("a9")).await.expect("remove again"));
    assert!(
        c.list_apps(&AppFilter::default(), &PageRequest::all())
            .await
            .expect("apps")
            .items
            .is_empty()
    );
    let err = c
        .touch_agent(&agent_id("a9"), t(800))
        .await
        .expect_err("removed");
    assert!(err.is_not_found());
}

pub(crate) async fn inventory_is_replaced_atomically(engine: Engine) {
    let f = fixture(engine).await;
    let c = &f.catalog;
    let prod = cluster("prod");
    let dev = cluster("dev");
    let err = c
        .replace_inventory(&prod, &node("n1"), vec![app("shop", "web", "/a")], t(1))
        .await
        .expect_err("unknown cluster");
    assert!(matches!(err, CatalogError::ClusterNotFound { .. }), "{err}");
    c.create_cluster(&prod, t(0)).await.expect("cluster");
    c.create_cluster(&dev, t(0)).await.expect("cluster");

    c.replace_inventory(
        &prod,
        &node("n1"),
        vec![
            app("shop", "web", "/srv/shop"),
            app("blog", "web", "/srv/blog"),
            app("warehouse", "data", "/srv/wh"),
        ],
        t(10),
    )
    .await
    .expect("first report");
    c.replace_inventory(
        &dev,
        &node("n1"),
        vec![app("shop", "web", "/dev/shop")],
        t(11),
    )
    .await
    .expect("dev report");

    let all = c
        .list_apps(&AppFilter::default(), &PageRequest::all())
        .await
        .expect("all")
        .items;
    let keys: Vec<_> = all
        .iter()
        .map(|a| format!("{}/{}/{}", a.cluster, a.app.team, a.app.name))
        .collect();
    assert_eq!(
        keys,
        [
            "dev/web/shop",
            "prod/data/warehouse",
            "prod/web/blog",
            "prod/web/shop"
        ]
    );
    let web_prod = c
        .list_apps(
            &AppFilter {
                cluster: Some(prod.clone()),
                team: Some(team("web")),
            },
            &PageRequest::all(),
        )
        .await
        .expect("filtered")
        .items;
    assert_eq!(web_prod.len(), 2);
    let web_all = c
        .list_apps(
            &AppFilter {
                cluster: None,
                team: Some(team("web")),
            },
            &PageRequest::all(),
        )
        .await
        .expect("filtered")
        .items;
    assert_eq!(web_all.len(), 3);
    let teams: Vec<_> = c
        .list_teams()
        .await
        .expect("teams")
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert_eq!(teams, ["data", "web"], "teams named by inventory exist");

    let shop = c
        .get_app(&prod, &team("web"), &AppName::new("shop").expect("name"))
        .await
        .expect("get")
        .expect("shop");
    assert_eq!(shop.node, node("n1"));
    assert_eq!(shop.reported_at, t(10));
    assert_eq!(shop.app, app("shop", "web", "/srv/shop"));

    // Another node may not claim an app node n1 reports; nothing changes.
    let err = c
        .replace_inventory(
            &prod,
            &node("n2"),
            vec![app("other", "web", "/o"), app("shop", "web", "/x")],
            t(20),
        )
        .await
        .expect_err("owned elsewhere");
    assert!(
        matches!(err, CatalogError::AppOwnedElsewhere { .. }),
        "{err}"
    );
    assert_eq!(
        c.list_apps(&AppFilter::default(), &PageRequest::all())
            .await
            .expect("all")
            .items
            .len(),
        4,
        "a refused report changes nothing"
    );

    // Invalid reports are refused before anything is written.
    let err = c
        .replace_inventory(
            &prod,
            &node("n1"),
            vec![app("shop", "web", "/a"), app("shop", "web", "/b")],
            t(21),
        )
        .await
        .expect_err("listed twice");
    assert!(matches!(err, CatalogError::InvalidRecord { .. }), "{err}");
    let mut dangling = app("shop", "web", "/a");
    dangling.volumes.clear();
    let err = c
        .replace_inventory(&prod, &node("n1"), vec![dangling], t(21))
        .await
        .expect_err("unknown volume");
    assert!(matches!(err, CatalogError::InvalidRecord { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("app shop of team web: component postgresql@15-main.service uses volume /a"),
        "{err}"
    );

    // A new report replaces the old one: blog and warehouse disappear.
    c.replace_inventory(
        &prod,
        &node("n1"),
        vec![app("shop", "web", "/srv/shop2")],
        t(30),
    )
    .await
    .expect("second report");
    let prod_apps = c
        .list_apps(
            &AppFilter {
                cluster: Some(prod.clone()),
                team: None,
            },
            &PageRequest::all(),
        )
        .await
        .expect("prod")
        .items;
    assert_eq!(prod_apps.len(), 1);
    assert_eq!(prod_apps[0].reported_at, t(30));
    assert_eq!(prod_apps[0].app.volumes[0].path.as_str(), "/srv/shop2");

    // An empty report clears the node; then n2 may take the app.
    c.replace_inventory(&prod, &node("n1"), vec![], t(40))
        .await
        .expect("empty report");
    c.replace_inventory(&prod, &node("n2"), vec![app("shop", "web", "/n2")], t(41))
        .await
        .expect("n2 takes shop");
    let prod_apps = c
        .list_apps(
            &AppFilter {
                cluster: Some(prod),
                team: None,
            },
            &PageRequest::all(),
        )
        .await
        .expect("prod")
        .items;
    assert_eq!(prod_apps.len(), 1);
    assert_eq!(prod_apps[0].node, node("n2"));
}

pub(crate) async fn everything_survives_reopen(engine: Engine) {
    let f = fixture(engine).await;
    let Fixture {
        _dir,
        path,
        catalog,
        ..
    } = f;
    let prod = cluster("prod");
    catalog.create_cluster(&prod, t(1)).await.expect("cluster");
    catalog.create_team(&team("ops"), t(2)).await.expect("team");
    catalog
        .put_join_token(TokenRecord::new(
            TokenHash::of("tok"),
            prod.clone(),
            t(3),
            t(1000),
        ))
        .await
        .expect("token");
    catalog
        .upsert_agent(agent("a1", "prod", "n1", 4))
        .await
        .expect("agent");
    catalog
        .replace_inventory(&prod, &node("n1"), vec![app("shop", "web", "/srv")], t(5))
        .await
        .expect("inventory");
    let before = (
        catalog
            .list_clusters(&PageRequest::all())
            .await
            .expect("clusters")
            .items,
        catalog.list_teams().await.expect("teams"),
        catalog.list_join_tokens(None).await.expect("tokens"),
        catalog
            .list_agents(None, &PageRequest::all())
            .await
            .expect("agents")
            .items,
        catalog
            .list_apps(&AppFilter::default(), &PageRequest::all())
            .await
            .expect("apps")
            .items,
    );
    drop(catalog);

    let catalog = open_when_free(engine, &path).await;
    let after = (
        catalog
            .list_clusters(&PageRequest::all())
            .await
            .expect("clusters")
            .items,
        catalog.list_teams().await.expect("teams"),
        catalog.list_join_tokens(None).await.expect("tokens"),
        catalog
            .list_agents(None, &PageRequest::all())
            .await
            .expect("agents")
            .items,
        catalog
            .list_apps(&AppFilter::default(), &PageRequest::all())
            .await
            .expect("apps")
            .items,
    );
    assert_eq!(after, before);
    assert_eq!(after.0.len(), 1);
    assert_eq!(after.1.len(), 2);
    // The single-use rule holds across a restart too.
    catalog
        .consume_join_token(&TokenHash::of("tok"), t(10), &node("n2"))
        .await
        .expect("consume");
    drop(catalog);
    let catalog = open_when_free(engine, &path).await;
    let err = catalog
        .consume_join_token(&TokenHash::of("tok"), t(11), &node("n3"))
        .await
        .expect_err("used before restart");
    assert!(matches!(err, CatalogError::TokenUsed { .. }), "{err}");
}

pub(crate) async fn the_catalog_is_private_to_its_owner(engine: Engine) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .expect("catalog metadata")
            .permissions()
            .mode()
            & 0o777
    };
    let private = match engine {
        Engine::Redb => 0o600,
        Engine::Sled => 0o700,
    };
    let f = fixture(engine).await;
    assert_eq!(mode(&f.path), private, "{engine} catalog created open");
    // Left open to others (by an older Ferry, a copy): tightened on open.
    drop(f.catalog);
    std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(private | 0o055))
        .expect("chmod catalog");
    let again = open_when_free(engine, &f.path).await;
    assert_eq!(mode(&f.path), private, "{engine} catalog left open");
    drop(again);
}

async fn second_open_is_refused(engine: Engine) {
    let f = fixture(engine).await;
    let err = match open(engine, &f.path).await {
        Ok(_) => panic!("a second handle on {} must be refused", f.path.display()),
        Err(e) => e,
    };
    assert!(matches!(err, CatalogError::InUse { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "catalog at {} is in use by another process",
            f.path.display()
        )
    );
    assert!(!err.is_transient());
    // The first handle still works.
    f.catalog
        .create_cluster(&cluster("prod"), t(1))
        .await
        .expect("still writable");
}

pub(crate) async fn future_versions_are_refused(engine: Engine) {
    let f = fixture(engine).await;
    let Fixture {
        _dir,
        path,
        catalog,
        engine,
    } = f;
    catalog
        .create_cluster(&cluster("old"), t(1))
        .await
        .expect("cluster");
    drop(catalog);
    plant(
        engine,
        &path,
        Table::Clusters,
        "new",
        br#"{"v":2,"record":{"name":"new","created_at":2,"region":"eu"}}"#,
    );
    let catalog = open_when_free(engine, &path).await;
    let err = catalog
        .list_clusters(&PageRequest::all())
        .await
        .expect_err("v2 record");
    assert!(
        matches!(
            err,
            CatalogError::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "clusters record new has format version 2, this build reads up to 1"
    );
    let err = catalog
        .get_cluster(&cluster("new"))
        .await
        .expect_err("v2 record");
    assert!(
        matches!(err, CatalogError::UnsupportedVersion { .. }),
        "{err}"
    );
    // Records this build understands are still readable.
    assert!(
        catalog
            .get_cluster(&cluster("old"))
            .await
            .expect("v1 record")
            .is_some()
    );
    drop(catalog);

    // A newer catalog layout refuses to open at all.
    plant(
        engine,
        &path,
        Table::Meta,
        "format",
        format!(
            "{{\"v\":1,\"record\":{{\"format\":{}}}}}",
            FORMAT_VERSION + 1
        )
        .as_bytes(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        match open(engine, &path).await {
            Ok(_) => panic!("a newer layout must not open"),
            Err(CatalogError::InUse { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            err,
            CatalogError::UnsupportedFormat {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("has format 2, this build reads up to 1")
    );
}

#[tokio::test]
async fn unknown_and_unbuilt_engines_are_clear_errors() {
    let err = "etcd".parse::<Engine>().expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "unknown catalog engine \"etcd\" (expected redb or sled)"
    );
    assert_eq!("redb".parse::<Engine>().expect("redb"), Engine::Redb);
    assert_eq!(Engine::default(), Engine::Redb);
    #[cfg(not(feature = "sled"))]
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = match open(Engine::Sled, dir.path()).await {
            Ok(_) => panic!("sled is not built"),
            Err(e) => e,
        };
        assert!(matches!(err, CatalogError::EngineNotBuilt { .. }), "{err}");
    }
}

/// Follows `next` from the first page to the last, checking that no page
/// is over its limit.
macro_rules! all_pages {
    ($page:ident, $limit:expr, $max_bytes:expr, $list:expr) => {{
        let mut out = Vec::new();
        let mut $page = PageRequest {
            after: None,
            limit: $limit,
            max_bytes: $max_bytes,
        };
        let mut pages = 0;
        loop {
            let got = $list.await.expect("page");
            assert!(got.items.len() <= $limit, "page over its limit");
            pages += 1;
            assert!(pages < 1000, "paging does not end");
            out.extend(got.items);
            match got.next {
                Some(next) => $page.after = Some(next),
                None => break,
            }
        }
        (out, pages)
    }};
}

pub(crate) async fn lists_come_in_pages(engine: Engine) {
    let f = fixture(engine).await;
    let c = &f.catalog;
    for cl in ["alpha", "beta", "gamma"] {
        c.create_cluster(&cluster(cl), t(0)).await.expect("cluster");
    }
    for i in 0..23 {
        let (cl, n) = if i < 5 { ("alpha", i) } else { ("beta", i) };
        c.upsert_agent(agent(&format!("a{i:02}"), cl, &format!("n{n:02}"), 1))
            .await
            .expect("agent");
        let apps = (0..3)
            .map(|k| {
                app(
                    &format!("app{i:02}-{k}"),
                    if k == 0 { "red" } else { "blue" },
                    "/srv/x",
                )
            })
            .collect();
        c.replace_inventory(&cluster(cl), &node(&format!("n{n:02}")), apps, t(2))
            .await
            .expect("inventory");
    }

    let (clusters, pages) = all_pages!(p, 2, usize::MAX, c.list_clusters(&p));
    let names: Vec<_> = clusters.iter().map(|c| c.name.to_string()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma"]);
    assert_eq!(pages, 2);

    let everything = c
        .list_apps(&AppFilter::default(), &PageRequest::all())
        .await
        .expect("all")
        .items;
    assert_eq!(everything.len(), 69);
    for limit in [1, 4, 10, 69, 70] {
        let (apps, _) = all_pages!(p, limit, usize::MAX, c.list_apps(&AppFilter::default(), &p));
        assert_eq!(apps, everything, "pages of {limit}");
    }
    // A byte budget ends pages early, never below one record.
    let (apps, pages) = all_pages!(p, 100, 1, c.list_apps(&AppFilter::default(), &p));
    assert_eq!(apps, everything);
    assert_eq!(pages, 69);
    // Filters page over the matching records only.
    let red = AppFilter {
        cluster: Some(cluster("beta")),
        team: Some(team("red")),
    };
    let (apps, _) = all_pages!(p, 4, usize::MAX, c.list_apps(&red, &p));
    assert_eq!(apps.len(), 18);
    assert!(
        apps.iter()
            .all(|a| a.cluster == cluster("beta") && a.app.team == team("red"))
    );

    let (agents, pages) = all_pages!(p, 2, usize::MAX, c.list_agents(Some(&cluster("alpha")), &p));
    let nodes: Vec<_> = agents.iter().map(|a| a.node.to_string()).collect();
    assert_eq!(nodes, ["n00", "n01", "n02", "n03", "n04"]);
    assert_eq!(pages, 3);
    let (agents, _) = all_pages!(p, 7, usize::MAX, c.list_agents(None, &p));
    assert_eq!(agents.len(), 23);
    let (none, _) = all_pages!(p, 7, usize::MAX, c.list_agents(Some(&cluster("gamma")), &p));
    assert!(none.is_empty());

    // A page token of one cluster's list is refused for another's.
    let alpha_first = c
        .list_agents(Some(&cluster("alpha")), &PageRequest::first(2))
        .await
        .expect("page")
        .next
        .expect("more pages");
    let foreign = PageRequest {
        after: Some(alpha_first),
        ..PageRequest::first(2)
    };
    let err = c
        .list_agents(Some(&cluster("beta")), &foreign)
        .await
        .expect_err("foreign token");
    assert!(err.to_string().contains("another list"), "{err}");

    // The node index answers for one node without a list.
    let found = c
        .agent_of_node(&cluster("beta"), &node("n07"))
        .await
        .expect("lookup")
        .expect("enrolled");
    assert_eq!(found.id, agent_id("a07"));
    assert_eq!(
        c.agent_of_node(&cluster("alpha"), &node("n07"))
            .await
            .expect("lookup"),
        None
    );
}

fn location(s: &str) -> LocationName {
    LocationName::new(s).expect("test location name")
}

pub(crate) async fn storage_locations_are_named_once(engine: Engine) {
    let f = fixture(engine).await;
    let c = &f.catalog;
    c.create_cluster(&cluster("prod"), t(1))
        .await
        .expect("cluster");
    let local = StorageRecord {
        name: location("disk"),
        kind: StorageKind::Local {
            cluster: cluster("prod"),
            path: "/srv/backups".into(),
        },
        sealed: "00ff".into(),
        repository_id: None,
        created_at: t(2),
    };
    c.add_storage(local.clone()).await.expect("add local");
    let s3 = StorageRecord {
        name: location("eu"),
        kind: StorageKind::S3 {
            endpoint: "https://s3.example".into(),
            bucket: "b".into(),
            prefix: "ferry".into(),
            region: "eu-1".into(),
        },
        sealed: "aa".into(),
        repository_id: None,
        created_at: t(3),
    };
    c.add_storage(s3.clone()).await.expect("add s3");

    // A name is taken once; a local location needs its cluster.
    let e = c.add_storage(local.clone()).await.expect_err("twice");
    assert!(matches!(e, CatalogError::StorageExists { .. }), "{e}");
    assert_eq!(e.code(), ErrorCode::AlreadyExists);
    let mut stray = local.clone();
    stray.name = location("stray");
    stray.kind = StorageKind::Local {
        cluster: cluster("nowhere"),
        path: "/x".into(),
    };
    let e = c.add_storage(stray).await.expect_err("unknown cluster");
    assert!(matches!(e, CatalogError::ClusterNotFound { .. }), "{e}");

    let listed = c.list_storage(&PageRequest::all()).await.expect("list");
    assert_eq!(listed.items, [local.clone(), s3.clone()], "ordered by name");

    // The repository id is recorded once created; a missing one cannot be updated.
    let mut created = s3.clone();
    created.repository_id = Some("r1".into());
    c.update_storage(created.clone()).await.expect("update");
    assert_eq!(
        c.get_storage(&location("eu")).await.expect("get"),
        Some(created)
    );
    let mut ghost = s3.clone();
    ghost.name = location("ghost");
    let e = c.update_storage(ghost).await.expect_err("missing");
    assert_eq!(e.code(), ErrorCode::NotFound);

    assert!(c.remove_storage(&location("disk")).await.expect("rm"));
    assert!(!c.remove_storage(&location("disk")).await.expect("rm again"));
    assert_eq!(c.get_storage(&location("disk")).await.expect("get"), None);
    assert!(
        StorageKind::S3 {
            endpoint: String::new(),
            bucket: String::new(),
            prefix: String::new(),
            region: String::new()
        }
        .reachable_from(&cluster("any"))
    );
    assert!(!local.kind.reachable_from(&cluster("other")));
    assert!(local.kind.reachable_from(&cluster("prod")));
}

fn manifest(id: u64, app_name: &str, storage: &str) -> ferry_core::AppManifest {
    ferry_core::AppManifest {
        format: ferry_core::backup::MANIFEST_FORMAT,
        backup: BackupId::new(id).expect("id"),
        job: JobId::new(1).expect("id"),
        storage: location(storage),
        ferry_version: "test".into(),
        cluster: cluster("prod"),
        node: NodeName::new("n1").expect("node"),
        app: app(app_name, "web", "/srv/data"),
        mode: ferry_core::BackupMode::Cold,
        stopped: Vec::new(),
        volumes: Vec::new(),
        images: None,
        remarks: Vec::new(),
        started_at: t(1),
        finished_at: t(2),
        timings: ferry_core::BackupTimings::default(),
    }
}

pub(crate) async fn jobs_and_backups_are_numbered_and_kept(engine: Engine) {
    let f = fixture(engine).await;
    let c = &f.catalog;
    // Sequences start at 1, never repeat, and are separate.
    assert_eq!(c.next_id(Counter::Job).await.expect("id"), 1);
    assert_eq!(c.next_id(Counter::Job).await.expect("id"), 2);
    assert_eq!(c.next_id(Counter::Backup).await.expect("id"), 1);
    let job = |id: u64, done: bool| JobRecord {
        id: JobId::new(id).expect("id"),
        kind: "backup".into(),
        created_at: t(id as i64),
        updated_at: t(id as i64),
        done,
        state: serde_json::json!({"step": id}),
    };
    for (id, done) in [(1, true), (2, false), (12, false)] {
        c.put_job(job(id, done)).await.expect("put job");
    }
    // A job written with an id the sequence had not reached moves it on.
    assert_eq!(c.next_id(Counter::Job).await.expect("id"), 13);
    let mut updated = job(2, true);
    updated.state = serde_json::json!({"step": "done"});
    c.put_job(updated.clone()).await.expect("update");
    assert_eq!(
        c.get_job(JobId::new(2).expect("id")).await.expect("get"),
        Some(updated)
    );
    let all = c
        .list_jobs(false, &PageRequest::all())
        .await
        .expect("list")
        .items;
    let ids: Vec<u64> = all.iter().map(|j| j.id.get()).collect();
    assert_eq!(ids, [1, 2, 12], "ordered by number, not as text");
    let active = c
        .list_jobs(true, &PageRequest::all())
        .await
        .expect("list")
        .items;
    assert_eq!(active.iter().map(|j| j.id.get()).collect::<Vec<_>>(), [12]);
    let first = c
        .list_jobs(false, &PageRequest::first(2))
        .await
        .expect("page");
    assert_eq!(first.items.len(), 2);
    assert!(first.next.is_some());

    for (id, a, s) in [(3, "shop", "nfs"), (9, "blog", "nfs"), (10, "shop", "s3")] {
        c.put_backup(BackupRecord {
            manifest: manifest(id, a, s),
            recorded_at: t(5),
        })
        .await
        .expect("put backup");
    }
    assert_eq!(c.next_id(Counter::Backup).await.expect("id"), 11);
    let b = c
        .get_backup(BackupId::new(9).expect("id"))
        .await
        .expect("get")
        .expect("present");
    assert_eq!(b.manifest, manifest(9, "blog", "nfs"));
    let shop = BackupFilter {
        app: Some(AppName::new("shop").expect("app")),
        ..BackupFilter::default()
    };
    let found = c
        .list_backups(&shop, &PageRequest::all())
        .await
        .expect("list")
        .items;
    assert_eq!(
        found.iter().map(|b| b.id().get()).collect::<Vec<_>>(),
        [3, 10]
    );
    let on_nfs = BackupFilter {
        storage: Some(location("nfs")),
        ..BackupFilter::default()
    };
    assert_eq!(
        c.list_backups(&on_nfs, &PageRequest::all())
            .await
            .expect("list")
            .items
            .len(),
        2
    );
    assert!(
        c.remove_backup(BackupId::new(3).expect("id"))
            .await
            .expect("rm")
    );
    assert!(
        !c.remove_backup(BackupId::new(3).expect("id"))
            .await
            .expect("rm again")
    );
    assert_eq!(
        c.get_backup(BackupId::new(3).expect("id"))
            .await
            .expect("get"),
        None
    );
    // Removing a backup never hands its id out again.
    assert_eq!(c.next_id(Counter::Backup).await.expect("id"), 12);
}

pub(crate) async fn ids_can_be_reserved(engine: Engine) {
    let Fixture {
        _dir,
        path,
        catalog,
        ..
    } = fixture(engine).await;
    // Ids used outside the catalog (found in a repository) are never
    // handed out; a lower id never moves the sequence back.
    assert_eq!(catalog.next_id(Counter::Backup).await.expect("id"), 1);
    catalog
        .reserve_id(Counter::Backup, 7)
        .await
        .expect("reserve");
    catalog
        .reserve_id(Counter::Backup, 3)
        .await
        .expect("reserve lower");
    catalog
        .reserve_id(Counter::Backup, 7)
        .await
        .expect("reserve again");
    assert_eq!(catalog.next_id(Counter::Backup).await.expect("id"), 8);
    // Each sequence on its own.
    assert_eq!(catalog.next_id(Counter::Job).await.expect("id"), 1);
    catalog.reserve_id(Counter::Job, 4).await.expect("reserve");
    assert_eq!(catalog.next_id(Counter::Backup).await.expect("id"), 9);
    // The end of the id space is refused rather than wrapped around, and
    // changes nothing.
    let err = catalog
        .reserve_id(Counter::Backup, u64::MAX)
        .await
        .expect_err("no id after the last");
    assert!(matches!(err, CatalogError::InvalidRecord { .. }), "{err}");
    assert_eq!(catalog.next_id(Counter::Backup).await.expect("id"), 10);
    catalog
        .reserve_id(Counter::Backup, 41)
        .await
        .expect("reserve");
    // Durable: the sequences continue after a reopen.
    drop(catalog);
    let catalog = open_when_free(engine, &path).await;
    assert_eq!(catalog.next_id(Counter::Backup).await.expect("id"), 42);
    assert_eq!(catalog.next_id(Counter::Job).await.expect("id"), 5);
}

macro_rules! conformance_suite {
    ($module:ident, $engine:expr) => {
        mod $module {
            use super::Engine;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn clusters_are_idempotent() {
                super::clusters_are_idempotent($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn teams_are_idempotent() {
                super::teams_are_idempotent($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn join_tokens_are_single_use_and_expire() {
                super::join_tokens_are_single_use_and_expire($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_consumers_have_one_winner() {
                super::concurrent_consumers_have_one_winner($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn agents_enrol_touch_and_leave() {
                super::agents_enrol_touch_and_leave($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn inventory_is_replaced_atomically() {
                super::inventory_is_replaced_atomically($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn storage_locations_are_named_once() {
                super::storage_locations_are_named_once($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn jobs_and_backups_are_numbered_and_kept() {
                super::jobs_and_backups_are_numbered_and_kept($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn ids_can_be_reserved() {
                super::ids_can_be_reserved($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn lists_come_in_pages() {
                super::lists_come_in_pages($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn everything_survives_reopen() {
                super::everything_survives_reopen($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn the_catalog_is_private_to_its_owner() {
                super::the_catalog_is_private_to_its_owner($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn second_open_is_refused() {
                super::second_open_is_refused($engine).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn future_versions_are_refused() {
                super::future_versions_are_refused($engine).await;
            }
        }
    };
}

conformance_suite!(redb_engine, Engine::Redb);
#[cfg(feature = "sled")]
conformance_suite!(sled_engine, Engine::Sled);
