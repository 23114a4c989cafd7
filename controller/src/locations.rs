//! Storage locations' secrets: the repository password the controller
//! generated (or was given) and S3 credentials, sealed into the catalog
//! record ([`crate::seal`]) and opened only to build the request of the
//! agent step that needs them.

use ferry_proto::v1 as pb;
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

/// Whether agents of `cluster` reach the location: a local location only
/// from its own cluster; shared and S3 locations from every cluster.
pub fn reachable_from(kind: &StorageKind, cluster: &ClusterName) -> bool {
    match kind {
        StorageKind::Local { cluster: own, .. } => own == cluster,
        StorageKind::Shared { .. } | StorageKind::S3 { .. } => true,
    }
}
