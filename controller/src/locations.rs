//! Storage locations' secrets: the repository password the controller
//! generated (or was given) and S3 credentials, sealed into the catalog
//! record ([`crate::seal`]) and opened only to build the request of the
//! agent step that needs them.

use ferry_proto::v1 as pb;
use ferry_store::{LocationError, S3Config, Secret, StorageConfig};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::catalog::{ClusterName, LocationName, StorageKind, StorageRecord};
use crate::seal::{SealError, SealKey};

/// What a location's sealed value holds.
#[derive(Serialize, Deserialize)]
pub struct Secrets {
    /// The repository password.
    pub password: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Secrets>,
}

#[derive(Serialize, Deserialize)]
pub struct S3Secrets {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: String,
}

impl Drop for Secrets {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.password.zeroize();
        if let Some(s) = &mut self.s3 {
            s.secret_access_key.zeroize();
            s.session_token.zeroize();
        }
    }
}

/// What the sealed value of location `name` is bound to.
fn purpose(name: &LocationName) -> String {
    format!("storage/{name}")
}

impl Secrets {
    /// Seals the secrets of location `name`, as stored in its record (hex).
    pub fn seal(&self, seal: &SealKey, name: &LocationName) -> String {
        let plain = Zeroizing::new(serde_json::to_vec(self).expect("invariant: secrets serialise"));
        hex::encode(seal.seal(&purpose(name), &plain))
    }

    /// Opens the secrets of a location's record.
    pub fn open(seal: &SealKey, r: &StorageRecord) -> Result<Self, SealError> {
        let fail = || SealError::Open {
            purpose: purpose(&r.name),
        };
        let sealed = hex::decode(&r.sealed).map_err(|_| fail())?;
        let plain = seal.open(&purpose(&r.name), &sealed)?;
        serde_json::from_slice(&plain).map_err(|_| fail())
    }

    pub fn password_bytes(&self) -> Vec<u8> {
        self.password.as_bytes().to_vec()
    }
}

/// The target an agent reaches the location by, with its credentials.
pub fn target(kind: &StorageKind, secrets: &Secrets) -> pb::StorageTarget {
    let t = match kind {
        StorageKind::Local { path, .. } | StorageKind::Shared { path } => {
            pb::storage_target::Target::Path(path.clone())
        }
        StorageKind::S3 {
            endpoint,
            bucket,
            prefix,
            region,
        } => pb::storage_target::Target::S3(pb::S3Target {
            endpoint: endpoint.clone(),
            bucket: bucket.clone(),
            prefix: prefix.clone(),
            region: region.clone(),
            credentials: secrets.s3.as_ref().map(|c| pb::S3Credentials {
                access_key_id: c.access_key_id.clone(),
                secret_access_key: c.secret_access_key.clone(),
                session_token: c.session_token.clone(),
            }),
        }),
    };
    pb::StorageTarget { target: Some(t) }
}

/// The store configuration the controller itself opens the location with
/// (an offline `catalog rebuild`): the directory, or the bucket with the
/// sealed credentials (without them, the standard AWS chain). The
/// credentials stay redacted from its `Debug` and `Display`.
pub fn store_config(kind: &StorageKind, secrets: &Secrets) -> Result<StorageConfig, LocationError> {
    match kind {
        StorageKind::Local { path, .. } | StorageKind::Shared { path } => {
            if !path.starts_with('/') {
                return Err(LocationError::RelativePath { path: path.clone() });
            }
            Ok(StorageConfig::Local { path: path.into() })
        }
        StorageKind::S3 {
            endpoint,
            bucket,
            prefix,
            region,
        } => {
            let mut c = S3Config::new(endpoint.clone(), bucket.clone());
            c.prefix.clone_from(prefix);
            if !region.is_empty() {
                c.region.clone_from(region);
            }
            if let Some(cred) = &secrets.s3 {
                c = c.with_credentials(&cred.access_key_id, &cred.secret_access_key);
                if !cred.session_token.is_empty() {
                    c.session_token = Some(Secret::new(cred.session_token.clone()));
                }
            }
            c.validate()?;
            Ok(StorageConfig::S3(Box::new(c)))
        }
    }
}

/// Whether agents of `cluster` reach the location: a local location only
/// from its own cluster; shared and S3 locations from every cluster.
pub fn reachable_from(kind: &StorageKind, cluster: &ClusterName) -> bool {
    match kind {
        StorageKind::Local { cluster: own, .. } => own == cluster,
        StorageKind::Shared { .. } | StorageKind::S3 { .. } => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_opens_a_location_as_its_agents_do() {
        let secrets = Secrets {
            password: "pw".into(),
            s3: Some(S3Secrets {
                access_key_id: "AKID".into(),
                secret_access_key: "hunter2secret".into(),
                session_token: String::new(),
            }),
        };
        let shared = StorageKind::Shared {
            path: "/srv/ferry".into(),
        };
        assert_eq!(
            store_config(&shared, &secrets).expect("shared"),
            StorageConfig::Local {
                path: "/srv/ferry".into()
            }
        );
        let relative = StorageKind::Shared { path: "srv".into() };
        assert!(store_config(&relative, &secrets).is_err());
        let s3 = StorageKind::S3 {
            endpoint: "http://127.0.0.1:8333".into(),
            bucket: "b".into(),
            prefix: "p".into(),
            region: String::new(),
        };
        let config = store_config(&s3, &secrets).expect("s3");
        let StorageConfig::S3(c) = &config else {
            panic!("not s3: {config}");
        };
        assert_eq!(c.access_key_id.as_deref(), Some("AKID"));
        assert_eq!(c.region, ferry_store::location::DEFAULT_REGION);
        assert_eq!(config.to_string(), "s3:http://127.0.0.1:8333/b/p");
        assert!(!format!("{config:?}").contains("hunter2secret"));
    }
}
