//! Storage locations over the operator API: add (creating the repository
//! through an agent that can reach the location), list, show, remove.
//! Secrets come in once, are sealed into the catalog, and never go out
//! again except to an agent inside the request that needs them.

use std::time::Duration;

use ferry_proto::convert::parse;
use ferry_proto::v1 as pb;
use zeroize::Zeroizing;

use super::ApiError;
use super::operator::{OperatorApi, next_token, page_request};
use crate::catalog::{ClusterName, LocationName, StorageKind, StorageRecord, Timestamp};
use crate::link::LinkError;
use crate::locations::{S3Secrets, Secrets, target};

/// How long an agent has to create or open a repository.
const INIT_TIMEOUT: Duration = Duration::from_secs(120);

fn absolute(what: &str, path: String) -> Result<String, ApiError> {
    if path.starts_with('/') && !path.split('/').any(|c| c == "..") {
        Ok(path)
    } else {
        Err(ApiError::Invalid(format!(
            "{what} {path:?} must be an absolute path without `..`"
        )))
    }
}

/// The location a request describes, checked.
fn kind_of(s: &pb::Storage) -> Result<StorageKind, ApiError> {
    let s = s.clone();
    match s.kind.as_str() {
        "local" => {
            let cluster: ClusterName = parse(|| "storage.cluster".to_owned(), s.cluster)?;
            Ok(StorageKind::Local {
                cluster,
                path: absolute("storage.path", s.path)?,
            })
        }
        "shared" => Ok(StorageKind::Shared {
            path: absolute("storage.path", s.path)?,
        }),
        "s3" => {
            let endpoint = s.endpoint.trim_end_matches('/').to_owned();
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ApiError::Invalid(format!(
                    "storage.endpoint {endpoint:?} must start with http:// or https://"
                )));
            }
            if s.bucket.is_empty() {
                return Err(ApiError::Invalid("storage.bucket is empty".into()));
            }
            Ok(StorageKind::S3 {
                endpoint,
                bucket: s.bucket,
                prefix: s.prefix.trim_matches('/').to_owned(),
                region: s.region,
            })
        }
        other => Err(ApiError::Invalid(format!(
            "storage.kind {other:?} is not local, shared or s3"
        ))),
    }
}

fn to_pb(r: StorageRecord, has_credentials: bool) -> pb::Storage {
    let mut out = pb::Storage {
        name: r.name.to_string(),
        kind: r.kind.label().to_owned(),
        repository_id: r.repository_id.unwrap_or_default(),
        created_unix_ms: r.created_at.unix_millis(),
        has_credentials,
        ..pb::Storage::default()
    };
    match r.kind {
        StorageKind::Local { cluster, path } => {
            out.cluster = cluster.to_string();
            out.path = path;
        }
        StorageKind::Shared { path } => out.path = path,
        StorageKind::S3 {
            endpoint,
            bucket,
            prefix,
            region,
        } => {
            out.endpoint = endpoint;
            out.bucket = bucket;
            out.prefix = prefix;
            out.region = region;
        }
    }
    out
}

/// How long an agent has to probe a location.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

impl OperatorApi {
    /// The location's secrets, opened with the seal key.
    fn secrets_of(&self, r: &StorageRecord) -> Result<Secrets, ApiError> {
        Ok(Secrets::open(&self.shared.seal, r)?)
    }

    /// One online agent of every cluster that can reach the location
    /// probes it; clusters with none online are reported as such.
    pub(super) async fn check_storage(
        &self,
        r: pb::CheckStorageRequest,
    ) -> Result<pb::CheckStorageResponse, ApiError> {
        let name: LocationName = parse(|| "name".to_owned(), r.name)?;
        let Some(record) = self.shared.catalog.get_storage(&name).await? else {
            return Err(crate::catalog::CatalogError::StorageNotFound { name }.into());
        };
        let secrets = self.secrets_of(&record)?;
        let clusters: Vec<ClusterName> = match &record.kind {
            StorageKind::Local { cluster, .. } => vec![cluster.clone()],
            _ => self
                .shared
                .catalog
                .list_clusters(&crate::catalog::PageRequest::all())
                .await?
                .items
                .into_iter()
                .map(|c| c.name)
                .collect(),
        };
        let probes = clusters.into_iter().map(|cluster| {
            let link = self.shared.fleet.online_links(Some(&cluster)).into_iter().next();
            let expected = record.repository_id.clone();
            let request = pb::request::Kind::ProbeStorage(pb::ProbeStorageRequest {
                target: Some(target(&record.kind, &secrets)),
                password: secrets.password.as_bytes().to_vec(),
            });
            async move {
                let mut check = pb::StorageCheck {
                    cluster: cluster.to_string(),
                    ..pb::StorageCheck::default()
                };
                let Some((_, node, link)) = link else {
                    check.error = format!("no agent of cluster {cluster} is online");
                    return check;
                };
                check.node = node.to_string();
                let answer = match link.call(request, PROBE_TIMEOUT).await {
                    Ok(call) => call.finish().await,
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(pb::reply::Result::ProbeStorage(p)) => {
                        if expected.as_deref().is_some_and(|id| id != p.repository_id) {
                            check.error = format!(
                                "the repository there is {}, not the one this location was created with",
                                p.repository_id
                            );
                        } else {
                            check.ok = true;
                            check.write_ms = p.write_ms;
                            check.read_ms = p.read_ms;
                        }
                    }
                    Ok(_) => check.error = LinkError::UnexpectedReply.to_string(),
                    Err(e) => check.error = e.to_string(),
                }
                check
            }
        });
        let checks = futures::future::join_all(probes).await;
        Ok(pb::CheckStorageResponse { checks })
    }

    fn has_credentials(&self, r: &StorageRecord) -> bool {
        Secrets::open(&self.shared.seal, r).is_ok_and(|s| s.s3.is_some())
    }

    pub(super) async fn add_storage(
        &self,
        r: pb::AddStorageRequest,
    ) -> Result<pb::Storage, ApiError> {
        let s = r
            .storage
            .ok_or_else(|| ApiError::Invalid("storage is missing".into()))?;
        let name: LocationName = parse(|| "storage.name".to_owned(), s.name.clone())?;
        let kind = kind_of(&s)?;
        let catalog = &self.shared.catalog;
        if catalog.get_storage(&name).await?.is_some() {
            return Err(crate::catalog::CatalogError::StorageExists { name }.into());
        }
        if let StorageKind::Local { cluster, .. } = &kind
            && catalog.get_cluster(cluster).await?.is_none()
        {
            return Err(crate::catalog::CatalogError::ClusterNotFound {
                cluster: cluster.clone(),
            }
            .into());
        }
        let s3 = match (r.credentials, &kind) {
            (Some(c), StorageKind::S3 { .. }) => {
                if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
                    return Err(ApiError::Invalid(
                        "credentials need both an access key id and a secret access key".into(),
                    ));
                }
                Some(S3Secrets {
                    access_key_id: c.access_key_id,
                    secret_access_key: c.secret_access_key,
                    session_token: c.session_token,
                })
            }
            (Some(_), _) => {
                return Err(ApiError::Invalid(format!(
                    "credentials are for s3 locations, not {} ones",
                    kind.label()
                )));
            }
            (None, _) => None,
        };
        let has_credentials = s3.is_some();
        let given = Zeroizing::new(r.password);
        let password = if given.is_empty() {
            hex::encode(rand::random::<[u8; 32]>())
        } else {
            String::from_utf8(given.to_vec()).map_err(|_| {
                ApiError::Invalid("the repository password is not UTF-8 text".into())
            })?
        };
        let secrets = Secrets { password, s3 };

        // An online agent that can reach it creates (or opens) the repository.
        let wanted = match &kind {
            StorageKind::Local { cluster, .. } => Some(cluster),
            _ => None,
        };
        let agents = self.shared.fleet.online_links(wanted);
        let Some((cluster, node, link)) = agents.into_iter().next() else {
            return Err(ApiError::Unavailable(match wanted {
                Some(c) => format!(
                    "no agent of cluster {c} is online to create the repository of storage {name}"
                ),
                None => format!("no agent is online to create the repository of storage {name}"),
            }));
        };
        let call = link
            .call(
                pb::request::Kind::InitRepository(pb::InitRepositoryRequest {
                    target: Some(target(&kind, &secrets)),
                    password: secrets.password.as_bytes().to_vec(),
                }),
                INIT_TIMEOUT,
            )
            .await?;
        let reply = match call.finish().await {
            Ok(pb::reply::Result::InitRepository(reply)) => reply,
            Ok(_) => return Err(LinkError::UnexpectedReply.into()),
            Err(e) => {
                tracing::warn!(storage = %name, cluster = %cluster, node = %node, error = %e, "repository not created");
                return Err(e.into());
            }
        };
        let record = StorageRecord {
            name: name.clone(),
            kind,
            sealed: secrets.seal(&self.shared.seal, &name),
            repository_id: Some(reply.repository_id),
            created_at: Timestamp::now(),
        };
        catalog.add_storage(record.clone()).await?;
        tracing::info!(storage = %name, kind = record.kind.label(), by_cluster = %cluster, by_node = %node,
            created = reply.created, "storage location added");
        Ok(to_pb(record, has_credentials))
    }

    pub(super) async fn list_storage(
        &self,
        r: pb::ListStorageRequest,
    ) -> Result<pb::ListStorageResponse, ApiError> {
        let page = self
            .shared
            .catalog
            .list_storage(&page_request(r.page_size, &r.page_token)?)
            .await?;
        let next_page_token = next_token(&page);
        Ok(pb::ListStorageResponse {
            storage: page
                .items
                .into_iter()
                .map(|s| {
                    let c = self.has_credentials(&s);
                    to_pb(s, c)
                })
                .collect(),
            next_page_token,
        })
    }

    pub(super) async fn get_storage(
        &self,
        r: pb::GetStorageRequest,
    ) -> Result<pb::Storage, ApiError> {
        let name: LocationName = parse(|| "name".to_owned(), r.name)?;
        match self.shared.catalog.get_storage(&name).await? {
            Some(s) => {
                let c = self.has_credentials(&s);
                Ok(to_pb(s, c))
            }
            None => Err(crate::catalog::CatalogError::StorageNotFound { name }.into()),
        }
    }

    pub(super) async fn remove_storage(
        &self,
        r: pb::RemoveStorageRequest,
    ) -> Result<pb::RemoveStorageResponse, ApiError> {
        let name: LocationName = parse(|| "name".to_owned(), r.name)?;
        let removed = self.shared.catalog.remove_storage(&name).await?;
        if removed {
            tracing::info!(storage = %name, "storage location removed");
        }
        Ok(pb::RemoveStorageResponse { removed })
    }
}
