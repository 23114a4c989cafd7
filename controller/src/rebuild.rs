//! `ferry-controller catalog rebuild`: recreates the catalog's backup
//! records of one storage location from that location's repository, the
//! source of truth (a backup exists when its app manifest `apps/<id>` is
//! committed there).
//!
//! Offline: the command opens the catalog itself, which a serving
//! controller holds, so it refuses to run beside `serve`. It opens the
//! location's sealed secrets with the controller's seal key, opens the
//! repository as an agent would, and then, for that location only:
//!
//! - records every manifest the catalog has no record of;
//! - replaces a record that differs from its manifest;
//! - removes every record whose manifest is not in the repository;
//! - reserves the ids the manifests use (backups, and the jobs that took
//!   them), so the catalog never hands them out again.
//!
//! A manifest that cannot be read or parsed is reported by name and
//! skipped; its id stays reserved and its record, if any, is kept.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_core::{AppManifest, CodedError, ErrorCode};
use ferry_repo::{RepoError, Repository};
use ferry_store::{LocationError, StoreError};
use futures::StreamExt;

use crate::catalog::{
    self, BackupFilter, BackupId, BackupRecord, Catalog, CatalogError, Counter, Engine,
    LocationName, Page, PageRequest, Timestamp,
};
use crate::locations::{self, Secrets};
use crate::seal::{SealError, SealKey};

/// Manifests read from the repository at once.
const READ_AHEAD: usize = 8;

/// What to rebuild.
#[derive(Debug, Clone)]
pub struct Options {
    /// The controller's data directory (catalog, `pki/seal.key`).
    pub data_dir: PathBuf,
    /// The engine the controller serves its catalog with.
    pub engine: Engine,
    /// The storage location whose backup records are rebuilt.
    pub storage: LocationName,
}

/// Why a rebuild could not run (or, [`RebuildError::Incomplete`], did not
/// record every manifest). Nothing is changed in the catalog before the
/// repository has been opened and listed.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(
        "no catalog at {} (is it the controller's data directory, served with --catalog-engine {engine}?)",
        path.display()
    )]
    NoCatalog { path: PathBuf, engine: Engine },
    #[error(
        "the catalog at {} is in use, most likely by a running controller: stop the controller (ferry-controller serve) before rebuilding its catalog",
        path.display()
    )]
    ControllerRunning { path: PathBuf },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("storage location {name} is not in the catalog")]
    StorageNotFound { name: LocationName },
    #[error("cannot open the secrets of storage {name}")]
    Secrets {
        name: LocationName,
        #[source]
        source: SealError,
    },
    #[error("storage {name} cannot be opened from its record")]
    Location {
        name: LocationName,
        #[source]
        source: LocationError,
    },
    #[error("cannot open storage {name} at {target}")]
    Store {
        name: LocationName,
        target: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "the repository of storage {name} at {target} does not open with the location's password: it belongs to another location or controller"
    )]
    WrongPassword { name: LocationName, target: String },
    #[error("repository of storage {name} at {target}")]
    Repository {
        name: LocationName,
        target: String,
        #[source]
        source: RepoError,
    },
    #[error(
        "storage {name} at {target} holds repository {found}, not {expected} the location was created with; nothing was changed"
    )]
    OtherRepository {
        name: LocationName,
        target: String,
        expected: String,
        found: String,
    },
    #[error(
        "{skipped} manifest(s) of storage {name} were skipped (reported above); the rest of the catalog was rebuilt"
    )]
    Incomplete { name: LocationName, skipped: usize },
}

impl CodedError for RebuildError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Catalog(e) => e.code(),
            Self::Secrets { source, .. } => source.code(),
            Self::Store { source, .. } if source.is_transient() => ErrorCode::Unavailable,
            Self::Repository { source, .. } if source.is_transient() => ErrorCode::Unavailable,
            Self::Store { .. } | Self::Repository { .. } => ErrorCode::FailedPrecondition,
            Self::NoCatalog { .. } | Self::StorageNotFound { .. } => ErrorCode::NotFound,
            Self::Location { .. } => ErrorCode::InvalidArgument,
            Self::ControllerRunning { .. }
            | Self::WrongPassword { .. }
            | Self::OtherRepository { .. } => ErrorCode::FailedPrecondition,
            // A manifest that failed to load may read on a second run.
            Self::Incomplete { .. } => ErrorCode::Unavailable,
        }
    }
}

/// A backup as the rebuild names it: id, app and where it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub id: BackupId,
    pub what: String,
}

impl Backup {
    fn of(m: &AppManifest) -> Self {
        Self {
            id: m.backup,
            what: format!(
                "{}/{} of cluster {}, taken {}",
                m.app.team, m.app.name, m.cluster, m.finished_at
            ),
        }
    }
}

/// One thing the rebuild did, or could not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Recorded from its manifest. `written_to` names the location the
    /// manifest says it was written to, when that is not this one (a
    /// repository brought under another name).
    Added {
        backup: Backup,
        written_to: Option<LocationName>,
    },
    /// Its record differed from the manifest and was replaced by it.
    Replaced { backup: Backup },
    /// Its manifest is not in the repository: the record was removed.
    Removed { backup: Backup },
    /// The manifest `apps/NAME` was not recorded.
    Skipped { name: String, reason: String },
}

impl Change {
    /// Whether this is a problem (said on stderr) rather than a change.
    pub fn is_problem(&self) -> bool {
        matches!(self, Self::Skipped { .. })
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Added { backup, written_to } => {
                write!(f, "added backup {}: {}", backup.id, backup.what)?;
                if let Some(other) = written_to {
                    write!(f, " (its manifest names storage {other})")?;
                }
                Ok(())
            }
            Self::Replaced { backup } => write!(
                f,
                "replaced backup {}: {} (the record differed from its manifest)",
                backup.id, backup.what
            ),
            Self::Removed { backup } => write!(
                f,
                "removed backup {}: {} (its manifest is not in the repository)",
                backup.id, backup.what
            ),
            Self::Skipped { name, reason } => write!(f, "skipped manifest apps/{name}: {reason}"),
        }
    }
}

/// How many records the rebuild added, replaced, removed and left as they
/// were, and how many manifests it skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub added: usize,
    pub replaced: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub skipped: usize,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} added, {} removed, {} unchanged",
            self.added, self.removed, self.unchanged
        )?;
        if self.replaced > 0 {
            write!(f, ", {} replaced", self.replaced)?;
        }
        if self.skipped > 0 {
            write!(f, ", {} skipped", self.skipped)?;
        }
        Ok(())
    }
}

/// What the repository holds.
#[derive(Debug, Default)]
pub struct Found {
    /// Every backup id a manifest is named by, readable or not.
    pub ids: BTreeSet<BackupId>,
    /// The manifests that read and parse, by id.
    pub manifests: BTreeMap<BackupId, AppManifest>,
    /// Manifests that did not: (name, reason).
    pub unreadable: Vec<(String, String)>,
}

/// The command: rebuilds, prints each change (problems on stderr) and the
/// summary, and fails at the end if a manifest was skipped.
pub async fn run(opts: &Options) -> Result<(), RebuildError> {
    let outcome = rebuild(opts, &mut |change| {
        if change.is_problem() {
            eprintln!("{change}");
        } else {
            println!("{change}");
        }
    })
    .await?;
    println!("storage {}: {outcome}", opts.storage);
    if outcome.skipped > 0 {
        return Err(RebuildError::Incomplete {
            name: opts.storage.clone(),
            skipped: outcome.skipped,
        });
    }
    Ok(())
}

/// Rebuilds the backup records of `opts.storage`, telling `report` each
/// change as it is made.
pub async fn rebuild(
    opts: &Options,
    report: &mut dyn FnMut(&Change),
) -> Result<Outcome, RebuildError> {
    let catalog = open_catalog(opts).await?;
    let name = &opts.storage;
    let record = catalog
        .get_storage(name)
        .await?
        .ok_or_else(|| RebuildError::StorageNotFound { name: name.clone() })?;
    let seal = SealKey::load(&opts.data_dir).map_err(|source| RebuildError::Secrets {
        name: name.clone(),
        source,
    })?;
    let secrets = Secrets::open(&seal, &record).map_err(|source| RebuildError::Secrets {
        name: name.clone(),
        source,
    })?;
    drop(seal);
    let config = locations::store_config(&record.kind, &secrets).map_err(|source| {
        RebuildError::Location {
            name: name.clone(),
            source,
        }
    })?;
    let target = config.to_string();
    let store = ferry_store::open(&config)
        .await
        .map_err(|source| RebuildError::Store {
            name: name.clone(),
            target: target.clone(),
            source,
        })?;
    drop(config);
    let password = zeroize::Zeroizing::new(secrets.password_bytes());
    drop(secrets);
    let repo_err = |source| RebuildError::Repository {
        name: name.clone(),
        target: target.clone(),
        source,
    };
    let repo = match Repository::open(store, &password).await {
        Ok(repo) => repo,
        Err(RepoError::WrongPassword) => {
            return Err(RebuildError::WrongPassword {
                name: name.clone(),
                target,
            });
        }
        Err(e) => return Err(repo_err(e)),
    };
    drop(password);
    if let Some(expected) = &record.repository_id
        && *expected != repo.config().id
    {
        return Err(RebuildError::OtherRepository {
            name: name.clone(),
            target,
            expected: expected.clone(),
            found: repo.config().id.clone(),
        });
    }
    let found = read_manifests(&repo).await.map_err(repo_err)?;
    tracing::info!(
        storage = %name,
        repository = %repo.config().id,
        manifests = found.ids.len(),
        "read the repository's app manifests"
    );
    Ok(reconcile(&*catalog, name, found, report).await?)
}

async fn open_catalog(opts: &Options) -> Result<Arc<dyn Catalog>, RebuildError> {
    let path = crate::config::catalog_path(&opts.data_dir, opts.engine);
    // Opening creates a missing catalog: an offline command must not.
    if !path.exists() {
        return Err(RebuildError::NoCatalog {
            path,
            engine: opts.engine,
        });
    }
    match catalog::open(opts.engine, &path).await {
        Ok(c) => Ok(c),
        Err(CatalogError::InUse { path }) => Err(RebuildError::ControllerRunning { path }),
        Err(e) => Err(e.into()),
    }
}

/// Lists and reads every app manifest of the repository. Only the listing
/// failing is an error; a manifest that does not read, parse or match its
/// name is set aside with the reason.
pub async fn read_manifests(repo: &Repository) -> Result<Found, RepoError> {
    let names = repo.app_manifest_names().await?;
    let mut found = Found::default();
    let mut named = Vec::with_capacity(names.len());
    for name in names {
        match name.parse::<BackupId>() {
            Ok(id) => {
                found.ids.insert(id);
                named.push((name, id));
            }
            Err(_) => found
                .unreadable
                .push((name, "its name is not a backup id".to_owned())),
        }
    }
    let mut loads = futures::stream::iter(named)
        .map(|(name, id)| async move {
            let loaded = repo.load_app_manifest(&name).await;
            (name, id, loaded)
        })
        .buffered(READ_AHEAD);
    while let Some((name, id, loaded)) = loads.next().await {
        let manifest = match loaded {
            // Removed since the listing: not in the repository any more.
            Ok(None) => {
                found.ids.remove(&id);
                continue;
            }
            Ok(Some(doc)) => AppManifest::parse(&doc),
            Err(e) => Err(ferry_core::Chain(&e).to_string()),
        };
        match manifest {
            Ok(m) if m.backup == id => {
                found.manifests.insert(id, m);
            }
            Ok(m) => found.unreadable.push((
                name,
                format!("it holds the manifest of backup {}", m.backup),
            )),
            Err(reason) => found.unreadable.push((name, reason)),
        }
    }
    Ok(found)
}

/// Brings the catalog's backup records of `storage` in line with what its
/// repository holds.
pub async fn reconcile(
    catalog: &dyn Catalog,
    storage: &LocationName,
    found: Found,
    report: &mut dyn FnMut(&Change),
) -> Result<Outcome, CatalogError> {
    let mut outcome = Outcome::default();
    // Ids first: whatever happens next, none is handed out again.
    for id in &found.ids {
        catalog.reserve_id(Counter::Backup, id.get()).await?;
    }
    let jobs: BTreeSet<u64> = found.manifests.values().map(|m| m.job.get()).collect();
    for job in jobs {
        catalog.reserve_id(Counter::Job, job).await?;
    }
    for (name, reason) in found.unreadable {
        outcome.skipped += 1;
        report(&Change::Skipped { name, reason });
    }
    for (id, mut manifest) in found.manifests {
        let written_to = (manifest.storage != *storage)
            .then(|| std::mem::replace(&mut manifest.storage, storage.clone()));
        let backup = Backup::of(&manifest);
        match catalog.get_backup(id).await? {
            None => {
                catalog
                    .put_backup(BackupRecord {
                        manifest,
                        recorded_at: Timestamp::now(),
                    })
                    .await?;
                outcome.added += 1;
                report(&Change::Added { backup, written_to });
            }
            Some(r) if r.manifest.storage != *storage => {
                outcome.skipped += 1;
                report(&Change::Skipped {
                    name: AppManifest::object_name(id),
                    reason: format!(
                        "the catalog records backup {id} in storage {}; left as it is",
                        r.manifest.storage
                    ),
                });
            }
            Some(r) if r.manifest == manifest => outcome.unchanged += 1,
            Some(r) => {
                catalog
                    .put_backup(BackupRecord {
                        manifest,
                        recorded_at: r.recorded_at,
                    })
                    .await?;
                outcome.replaced += 1;
                report(&Change::Replaced { backup });
            }
        }
    }
    let filter = BackupFilter {
        storage: Some(storage.clone()),
        ..BackupFilter::default()
    };
    let mut page = PageRequest::first(256);
    loop {
        let Page { items, next } = catalog.list_backups(&filter, &page).await?;
        for r in items {
            if !found.ids.contains(&r.id()) && catalog.remove_backup(r.id()).await? {
                outcome.removed += 1;
                report(&Change::Removed {
                    backup: Backup::of(&r.manifest),
                });
            }
        }
        match next {
            Some(after) => page.after = Some(after),
            None => break,
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use ferry_core::{
        App, Argv, BackupMode, BackupTimings, Component, ComponentKind, ComponentState,
        HostComponent, HostPath, JobId, Volume,
    };
    use ferry_store::{MemoryStore, ObjectStore};

    use super::*;
    use crate::catalog::{StorageKind, StorageRecord};

    fn loc(s: &str) -> LocationName {
        s.parse().expect("location")
    }

    fn manifest(id: u64, job: u64, storage: &str) -> AppManifest {
        let argv = |s: &str| Argv::new(vec![s.to_owned()]).expect("argv");
        AppManifest {
            format: ferry_core::backup::MANIFEST_FORMAT,
            backup: BackupId::new(id).expect("id"),
            job: JobId::new(job).expect("id"),
            storage: loc(storage),
            ferry_version: "test".into(),
            cluster: "a".parse().expect("cluster"),
            node: "n1".parse().expect("node"),
            app: App {
                name: "shop".parse().expect("app"),
                team: "web".parse().expect("team"),
                components: vec![Component {
                    name: "db".parse().expect("component"),
                    kind: ComponentKind::Host(HostComponent::Commands {
                        start: argv("start"),
                        stop: argv("stop"),
                        status: None,
                    }),
                    stateful: true,
                    volumes: vec!["/srv/db".parse().expect("volume")],
                    depends_on: vec![],
                    state: ComponentState::Running,
                    hooks: Default::default(),
                }],
                volumes: vec![Volume {
                    name: "/srv/db".parse().expect("volume"),
                    path: HostPath::new("/srv/db").expect("path"),
                }],
            },
            mode: BackupMode::Cold,
            stopped: vec![],
            volumes: vec![],
            images: None,
            remarks: Vec::new(),
            started_at: Timestamp::from_unix_millis(1),
            finished_at: Timestamp::from_unix_millis(2),
            timings: BackupTimings::default(),
        }
    }

    fn record(m: AppManifest) -> BackupRecord {
        BackupRecord {
            manifest: m,
            recorded_at: Timestamp::from_unix_millis(5),
        }
    }

    async fn ids(catalog: &dyn Catalog, storage: Option<&str>) -> Vec<u64> {
        let filter = BackupFilter {
            storage: storage.map(loc),
            ..BackupFilter::default()
        };
        catalog
            .list_backups(&filter, &PageRequest::all())
            .await
            .expect("list")
            .items
            .iter()
            .map(|b| b.id().get())
            .collect()
    }

    #[tokio::test]
    async fn records_follow_the_repository_and_other_locations_are_left_alone() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let repo = Repository::init(store, b"pw", "test").await.expect("init");
        for m in [
            manifest(2, 2, "nfs"),
            manifest(3, 3, "nfs"),
            // Written while the location had another name.
            manifest(5, 20, "old-name"),
            // Recorded in another location.
            manifest(8, 8, "nfs"),
        ] {
            repo.save_app_manifest(&m.backup.to_string(), &m.to_json())
                .await
                .expect("save");
        }
        repo.save_app_manifest("9", b"not a manifest")
            .await
            .expect("save");
        repo.save_app_manifest("6", &manifest(4, 4, "nfs").to_json())
            .await
            .expect("save");
        repo.save_app_manifest("x", b"{}").await.expect("save");

        let dir = tempfile::tempdir().expect("tmp");
        let catalog = catalog::open(Engine::Redb, &dir.path().join("catalog.redb"))
            .await
            .expect("catalog");
        let mut changed = manifest(2, 2, "nfs");
        changed.ferry_version = "edited".into();
        for m in [
            // Its manifest is gone: removed.
            manifest(1, 1, "nfs"),
            changed,
            manifest(3, 3, "nfs"),
            // Another location's: untouched.
            manifest(4, 4, "s3"),
            manifest(8, 8, "s3"),
        ] {
            catalog.put_backup(record(m)).await.expect("put");
        }

        let mut said = Vec::new();
        let found = read_manifests(&repo).await.expect("read");
        assert_eq!(
            found.ids.iter().map(|i| i.get()).collect::<Vec<_>>(),
            [2, 3, 5, 6, 8, 9]
        );
        let outcome = reconcile(&*catalog, &loc("nfs"), found, &mut |c| {
            said.push(c.to_string())
        })
        .await
        .expect("reconcile");
        assert_eq!(
            outcome,
            Outcome {
                added: 1,
                replaced: 1,
                removed: 1,
                unchanged: 1,
                skipped: 4,
            }
        );
        assert_eq!(
            outcome.to_string(),
            "1 added, 1 removed, 1 unchanged, 1 replaced, 4 skipped"
        );
        let has = |needle: &str| said.iter().any(|s| s.contains(needle));
        assert!(
            has("added backup 5: web/shop of cluster a") && has("names storage old-name"),
            "{said:?}"
        );
        assert!(has("replaced backup 2"), "{said:?}");
        assert!(
            has("removed backup 1") && has("not in the repository"),
            "{said:?}"
        );
        assert!(has("skipped manifest apps/9: "), "{said:?}");
        assert!(
            has("skipped manifest apps/6: it holds the manifest of backup 4"),
            "{said:?}"
        );
        assert!(
            has("skipped manifest apps/x: its name is not a backup id"),
            "{said:?}"
        );
        assert!(
            has("skipped manifest apps/8: the catalog records backup 8 in storage s3"),
            "{said:?}"
        );

        assert_eq!(ids(&*catalog, Some("nfs")).await, [2, 3, 5]);
        assert_eq!(ids(&*catalog, Some("s3")).await, [4, 8]);
        let five = catalog
            .get_backup(BackupId::new(5).expect("id"))
            .await
            .expect("get")
            .expect("recorded");
        assert_eq!(five.manifest.storage, loc("nfs"), "recorded where found");
        let two = catalog
            .get_backup(BackupId::new(2).expect("id"))
            .await
            .expect("get")
            .expect("kept");
        assert_eq!(two.manifest, manifest(2, 2, "nfs"));
        assert_eq!(two.recorded_at, Timestamp::from_unix_millis(5));
        // The unreadable manifest's id and the manifests' jobs are never
        // handed out.
        assert_eq!(catalog.next_id(Counter::Backup).await.expect("id"), 10);
        assert_eq!(catalog.next_id(Counter::Job).await.expect("id"), 21);

        // Again: nothing to do but the same skips.
        let found = read_manifests(&repo).await.expect("read");
        let again = reconcile(&*catalog, &loc("nfs"), found, &mut |_| {})
            .await
            .expect("reconcile");
        assert_eq!(
            again,
            Outcome {
                unchanged: 3,
                skipped: 4,
                ..Outcome::default()
            }
        );
    }

    /// A data directory with a seal key, a catalog holding location `nfs`
    /// (shared, at `repo/`) and that location's repository.
    async fn data_dir() -> (tempfile::TempDir, Options, Repository) {
        let dir = tempfile::tempdir().expect("tmp");
        let data = dir.path().join("data");
        crate::config::private_dir(&data.join("pki")).expect("pki");
        let seal = SealKey::load_or_create(&data).expect("seal key");
        let path = dir.path().join("repo");
        let config = ferry_store::StorageConfig::Local { path: path.clone() };
        let store = ferry_store::open(&config).await.expect("store");
        let repo = Repository::init(store, b"s3cret-pw", "test")
            .await
            .expect("init");
        let secrets = Secrets {
            password: "s3cret-pw".into(),
            s3: None,
        };
        let catalog = catalog::open(
            Engine::Redb,
            &crate::config::catalog_path(&data, Engine::Redb),
        )
        .await
        .expect("catalog");
        catalog
            .add_storage(StorageRecord {
                name: loc("nfs"),
                kind: StorageKind::Shared {
                    path: path.display().to_string(),
                },
                sealed: secrets.seal(&seal, &loc("nfs")),
                repository_id: Some(repo.config().id.clone()),
                created_at: Timestamp::from_unix_millis(1),
            })
            .await
            .expect("storage");
        let opts = Options {
            data_dir: data,
            engine: Engine::Redb,
            storage: loc("nfs"),
        };
        (dir, opts, repo)
    }

    #[tokio::test]
    async fn a_rebuild_opens_the_location_and_refuses_a_served_catalog() {
        let (_dir, opts, repo) = data_dir().await;
        let m = manifest(1, 1, "nfs");
        repo.save_app_manifest("1", &m.to_json())
            .await
            .expect("save");

        // The catalog held (as by `serve`): refused, saying what to do.
        let held = catalog::open(
            opts.engine,
            &crate::config::catalog_path(&opts.data_dir, opts.engine),
        )
        .await
        .expect("open");
        let err = rebuild(&opts, &mut |_| {}).await.expect_err("in use");
        assert!(
            matches!(err, RebuildError::ControllerRunning { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("stop the controller"), "{err}");
        drop(held);

        let mut said = Vec::new();
        let outcome = rebuild(&opts, &mut |c| said.push(c.to_string()))
            .await
            .expect("rebuild");
        assert_eq!(outcome.to_string(), "1 added, 0 removed, 0 unchanged");
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(!said[0].contains("s3cret"), "{said:?}");

        // Unknown location, wrong engine or directory: nothing is created.
        let unknown = Options {
            storage: loc("elsewhere"),
            ..opts.clone()
        };
        let err = rebuild(&unknown, &mut |_| {}).await.expect_err("unknown");
        assert!(matches!(err, RebuildError::StorageNotFound { .. }), "{err}");
        let sled = Options {
            engine: Engine::Sled,
            ..opts.clone()
        };
        let err = rebuild(&sled, &mut |_| {}).await.expect_err("no catalog");
        assert!(matches!(err, RebuildError::NoCatalog { .. }), "{err}");
        assert!(!crate::config::catalog_path(&opts.data_dir, Engine::Sled).exists());

        // Another repository at the path: refused, nothing removed.
        let catalog = catalog::open(
            opts.engine,
            &crate::config::catalog_path(&opts.data_dir, opts.engine),
        )
        .await
        .expect("open");
        let mut rec = catalog
            .get_storage(&opts.storage)
            .await
            .expect("get")
            .expect("storage");
        rec.repository_id = Some("another".into());
        catalog.update_storage(rec).await.expect("update");
        drop(catalog);
        repo.remove_app_manifest("1").await.expect("rm");
        let err = rebuild(&opts, &mut |_| {}).await.expect_err("other repo");
        assert!(matches!(err, RebuildError::OtherRepository { .. }), "{err}");
        let catalog = catalog::open(
            opts.engine,
            &crate::config::catalog_path(&opts.data_dir, opts.engine),
        )
        .await
        .expect("open");
        assert_eq!(ids(&*catalog, None).await, [1], "nothing was changed");
        drop(catalog);

        // Without the seal key the secrets do not open, and no key is made.
        std::fs::remove_file(crate::seal::key_path(&opts.data_dir)).expect("rm key");
        let err = rebuild(&opts, &mut |_| {}).await.expect_err("no key");
        assert!(matches!(err, RebuildError::Secrets { .. }), "{err}");
        assert!(!crate::seal::key_path(&opts.data_dir).exists());
    }
}
