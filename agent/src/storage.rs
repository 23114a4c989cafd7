//! Storage locations as the controller hands them to an agent: a target
//! (a directory or an S3 bucket, with credentials) and the repository
//! password, for one request only. Nothing here is stored or logged.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::ErrorCode;
use ferry_proto::v1 as pb;
use ferry_repo::{RepoError, Repository};
use ferry_store::{ObjectStore, S3Config, StorageConfig};

/// Why a storage request failed, with the code the controller sees.
#[derive(Debug)]
pub struct StorageFailure {
    pub code: ErrorCode,
    pub message: String,
}

fn invalid(message: impl Into<String>) -> StorageFailure {
    StorageFailure {
        code: ErrorCode::InvalidArgument,
        message: message.into(),
    }
}

/// The store configuration of a target; credentials stay in it, redacted
/// from its `Debug` and `Display`.
/// `retry` bounds how long a transient storage failure is retried.
pub fn config(
    target: Option<pb::StorageTarget>,
    retry: Duration,
) -> Result<StorageConfig, StorageFailure> {
    let target = target
        .and_then(|t| t.target)
        .ok_or_else(|| invalid("the storage target is missing"))?;
    let config = match target {
        pb::storage_target::Target::Path(p) => {
            let path = std::path::PathBuf::from(&p);
            if !path.is_absolute() {
                return Err(invalid(format!(
                    "storage path {p:?} is not an absolute path"
                )));
            }
            StorageConfig::Local { path }
        }
        pb::storage_target::Target::S3(s3) => {
            let mut c = S3Config::new(s3.endpoint, s3.bucket);
            c.prefix = s3.prefix;
            if !s3.region.is_empty() {
                c.region = s3.region;
            }
            if let Some(cred) = s3.credentials {
                c = c.with_credentials(&cred.access_key_id, &cred.secret_access_key);
                if !cred.session_token.is_empty() {
                    c.session_token = Some(ferry_store::Secret::new(cred.session_token));
                }
            }
            c.tuning.retry.deadline = retry;
            c.validate().map_err(|e| invalid(e.to_string()))?;
            StorageConfig::S3(Box::new(c))
        }
    };
    Ok(config)
}

pub fn repo_failure(target: &str, e: RepoError) -> StorageFailure {
    let code = match &e {
        RepoError::WrongPassword => ErrorCode::FailedPrecondition,
        e if e.is_transient() => ErrorCode::Unavailable,
        e if e.is_usage() => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    };
    let message = match e {
        RepoError::WrongPassword => format!(
            "the repository at {target} does not open with this location's password: it belongs to another location or controller"
        ),
        e => format!("repository at {target}: {}", ferry_core::Chain(&e)),
    };
    StorageFailure { code, message }
}

fn store_failure(op: &str, target: &str, e: ferry_store::StoreError) -> StorageFailure {
    StorageFailure {
        code: if e.is_transient() {
            ErrorCode::Unavailable
        } else {
            ErrorCode::FailedPrecondition
        },
        message: format!("cannot {op} storage {target}: {}", ferry_core::Chain(&e)),
    }
}

/// A repository as a step gets it: where it is (credentials inside,
/// redacted from `Debug`) and its password, for this request only.
pub struct RepoAccess {
    config: StorageConfig,
    password: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for RepoAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoAccess({})", self.config)
    }
}

impl RepoAccess {
    /// From a request's target and password; `retry` bounds how long a
    /// transient storage failure is retried.
    pub fn new(
        target: Option<pb::StorageTarget>,
        password: Vec<u8>,
        retry: Duration,
    ) -> Result<Self, StorageFailure> {
        let config = config(target, retry)?;
        let password = zeroize::Zeroizing::new(password);
        if password.is_empty() {
            return Err(invalid("the repository password is empty"));
        }
        Ok(Self { config, password })
    }

    /// A local directory's repository (tests, tools).
    pub fn local(path: &std::path::Path, password: &[u8]) -> Self {
        Self {
            config: StorageConfig::Local {
                path: path.to_path_buf(),
            },
            password: zeroize::Zeroizing::new(password.to_vec()),
        }
    }

    /// Opens the repository; returns it and the target's description for
    /// messages.
    pub async fn open(&self) -> Result<(Repository, String), StorageFailure> {
        let target = self.config.to_string();
        let store = ferry_store::open(&self.config)
            .await
            .map_err(|e| store_failure("open", &target, e))?;
        let repo = Repository::open(store, &self.password)
            .await
            .map_err(|e| repo_failure(&target, e))?;
        Ok((repo, target))
    }
}

/// The target's store, its description for messages, and the password.
async fn open_target(
    target: Option<pb::StorageTarget>,
    password: Vec<u8>,
    retry: Duration,
) -> Result<(Arc<dyn ObjectStore>, String, zeroize::Zeroizing<Vec<u8>>), StorageFailure> {
    let config = config(target, retry)?;
    let password = zeroize::Zeroizing::new(password);
    if password.is_empty() {
        return Err(invalid("the repository password is empty"));
    }
    let target = config.to_string();
    let store = ferry_store::open(&config)
        .await
        .map_err(|e| store_failure("open", &target, e))?;
    Ok((store, target, password))
}

/// Creates the repository at the target, or opens the one there with the
/// password; returns its id and whether it was created.
pub async fn init_repository(
    r: pb::InitRepositoryRequest,
    retry: Duration,
) -> Result<pb::InitRepositoryReply, StorageFailure> {
    let (store, target, password) = open_target(r.target, r.password, retry).await?;
    let (repo, created) = match Repository::open(store.clone(), &password).await {
        Ok(repo) => (repo, false),
        Err(RepoError::NotARepository) => {
            let repo = Repository::init(store, &password, "ferry controller")
                .await
                .map_err(|e| repo_failure(&target, e))?;
            (repo, true)
        }
        Err(e) => return Err(repo_failure(&target, e)),
    };
    tracing::info!(storage = %target, repository = %repo.config().id, created, "repository ready");
    Ok(pb::InitRepositoryReply {
        repository_id: repo.config().id.clone(),
        created,
    })
}

/// Opens the target's repository with the password, then writes, reads
/// back and removes a probe object, timing both.
pub async fn probe_storage(
    r: pb::ProbeStorageRequest,
    retry: Duration,
) -> Result<pb::ProbeStorageReply, StorageFailure> {
    let (store, target, password) = open_target(r.target, r.password, retry).await?;
    let repo = Repository::open(store.clone(), &password)
        .await
        .map_err(|e| repo_failure(&target, e))?;
    let probe: [u8; 16] = rand::random();
    let key = ferry_store::ObjectKey::new(format!("probes/{}", hex::encode(probe)))
        .map_err(|e| store_failure("write to", &target, e))?;
    let body = bytes::Bytes::from((0..4096u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let ms = |t: std::time::Instant| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
    let t = std::time::Instant::now();
    store
        .put(&key, body.clone())
        .await
        .map_err(|e| store_failure("write to", &target, e))?;
    let write_ms = ms(t);
    let t = std::time::Instant::now();
    let got = store.get(&key).await;
    let read_ms = ms(t);
    let removed = store.delete(&key).await;
    let got = got.map_err(|e| store_failure("read from", &target, e))?;
    if got != body {
        return Err(StorageFailure {
            code: ErrorCode::Internal,
            message: format!("storage {target} returned other bytes than the probe it was given"),
        });
    }
    removed.map_err(|e| store_failure("delete from", &target, e))?;
    Ok(pb::ProbeStorageReply {
        repository_id: repo.config().id.clone(),
        write_ms,
        read_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Duration = Duration::from_secs(300);

    fn local(path: &std::path::Path, password: &[u8]) -> pb::InitRepositoryRequest {
        pb::InitRepositoryRequest {
            target: Some(pb::StorageTarget {
                target: Some(pb::storage_target::Target::Path(path.display().to_string())),
            }),
            password: password.to_vec(),
        }
    }

    #[tokio::test]
    async fn a_repository_is_created_once_then_opened_with_its_password() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("repo");
        let first = init_repository(local(&dir, b"pw-1"), RETRY)
            .await
            .expect("create");
        assert!(first.created);
        assert_eq!(first.repository_id.len(), 64);
        assert!(dir.join("config").exists());
        let again = init_repository(local(&dir, b"pw-1"), RETRY)
            .await
            .expect("open");
        assert!(!again.created);
        assert_eq!(again.repository_id, first.repository_id);
        // A check opens it, and leaves no probe behind.
        let check = |pw: &[u8]| {
            let r = local(&dir, pw);
            probe_storage(
                pb::ProbeStorageRequest {
                    target: r.target,
                    password: r.password,
                },
                RETRY,
            )
        };
        let checked = check(b"pw-1").await.expect("check");
        assert_eq!(checked.repository_id, first.repository_id);
        assert_eq!(
            std::fs::read_dir(dir.join("probes"))
                .map(|d| d.count())
                .unwrap_or(0),
            0
        );
        assert_eq!(
            check(b"pw-2").await.expect_err("wrong password").code,
            ErrorCode::FailedPrecondition
        );
        // Another password: refused, and the repository is left as it was.
        let e = init_repository(local(&dir, b"pw-2"), RETRY)
            .await
            .expect_err("wrong password");
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert!(
            e.message
                .contains("does not open with this location's password"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("pw-"), "{}", e.message);
        // Bad input is named.
        let e = init_repository(local(std::path::Path::new("relative"), b"pw"), RETRY)
            .await
            .expect_err("relative");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        let e = init_repository(local(&dir, b""), RETRY)
            .await
            .expect_err("empty password");
        assert!(e.message.contains("password is empty"), "{}", e.message);
        let e = init_repository(pb::InitRepositoryRequest::default(), RETRY)
            .await
            .expect_err("no target");
        assert!(e.message.contains("target is missing"), "{}", e.message);
    }

    #[tokio::test]
    async fn an_s3_repository_is_created_with_the_credentials_given_and_none_else() {
        let weed = ferry_store::testing::seaweed().await;
        let bucket = weed.new_bucket().await;
        let good = weed.config(&bucket, "ferry");
        let s3 = |secret: &str| pb::InitRepositoryRequest {
            target: Some(pb::StorageTarget {
                target: Some(pb::storage_target::Target::S3(pb::S3Target {
                    endpoint: good.endpoint.clone().expect("endpoint"),
                    bucket: bucket.clone(),
                    prefix: "ferry".into(),
                    region: String::new(),
                    credentials: Some(pb::S3Credentials {
                        access_key_id: good.access_key_id.clone().expect("key id"),
                        secret_access_key: secret.to_owned(),
                        session_token: String::new(),
                    }),
                })),
            }),
            password: b"pw".to_vec(),
        };
        let secret = good
            .secret_access_key
            .as_ref()
            .expect("secret")
            .expose()
            .to_owned();
        let made = init_repository(s3(&secret), RETRY).await.expect("create");
        assert!(made.created);
        let again = init_repository(s3(&secret), RETRY).await.expect("open");
        assert_eq!(again.repository_id, made.repository_id);
        // A wrong secret is refused without repeating it.
        let e = init_repository(s3("not-the-secret-at-all"), RETRY)
            .await
            .expect_err("wrong secret");
        assert!(
            !e.message.contains("not-the-secret-at-all"),
            "{}",
            e.message
        );
        assert!(e.message.contains(&bucket), "{}", e.message);
    }
}
