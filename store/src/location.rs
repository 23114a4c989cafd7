//! How a user names a storage location, on the command line and in config
//! files, and how a location is opened.
//!
//! On the command line (restic-like):
//!
//! - `/abs/path` or `local:/abs/path`: a local directory;
//! - `s3:http(s)://ENDPOINT/BUCKET[/PREFIX]`: a bucket on any S3-compatible
//!   endpoint, path-style by default.
//!
//! In config files, [`StorageConfig`] (serde, tagged by `type`):
//!
//! ```toml
//! type = "s3"
//! endpoint = "http://127.0.0.1:8333"
//! bucket = "backups"
//! prefix = "team-a"
//! region = "us-east-1"          # default
//! access_key_id = "…"           # both or neither; without them the standard
//! secret_access_key = "…"       # AWS chain (env AWS_ACCESS_KEY_ID/…, profile)
//! ```
//!
//! Neither `Debug` nor `Display` of any of these types ever shows a secret.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::retry::RetryPolicy;

/// A storage location as configured by a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StorageConfig {
    /// A directory on this machine.
    Local { path: PathBuf },
    /// A bucket (and optional prefix) on an S3-compatible endpoint.
    S3(Box<S3Config>),
}

/// Default region when none is configured; S3-compatible servers accept any.
pub const DEFAULT_REGION: &str = "us-east-1";

/// An S3 location with its connection settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Config {
    /// `http(s)://host[:port]`; `None` means AWS itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Objects live below `prefix/` in the bucket; empty for the whole bucket.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`); default: on with a
    /// custom endpoint, off for AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// Explicit credentials; without them the standard AWS chain is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// Read from config files, never written anywhere: a serialized
    /// config holds no secret (the controller hands secrets to agents in
    /// its own sealed form).
    #[serde(default, skip_serializing)]
    pub secret_access_key: Option<Secret>,
    #[serde(default, skip_serializing)]
    pub session_token: Option<Secret>,
    /// Transfer tuning; defaults suit most servers.
    #[serde(default)]
    pub tuning: S3Tuning,
}

/// Multipart, retry and timeout settings of an S3 location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Tuning {
    /// Objects larger than this are uploaded in parts.
    pub multipart_threshold: u64,
    /// Size of each part (S3 requires at least 5 MiB, except the last).
    pub part_size: u64,
    /// Parts of one object uploaded at the same time.
    pub part_concurrency: usize,
    /// How long a transient failure is retried (the only retries: the
    /// client library's own are off).
    pub retry: RetryPolicy,
    /// Time to establish a connection.
    #[serde(with = "crate::retry::serde_secs")]
    pub connect_timeout: Duration,
    /// Time one attempt of one request may take, body transfer included.
    #[serde(with = "crate::retry::serde_secs")]
    pub attempt_timeout: Duration,
    /// Idle connections kept per host for reuse.
    pub max_idle_connections: usize,
}

impl Default for S3Tuning {
    fn default() -> Self {
        Self {
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
            part_concurrency: 4,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(60),
            max_idle_connections: 32,
        }
    }
}

/// The smallest part S3 accepts (other than the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;

fn default_region() -> String {
    DEFAULT_REGION.to_owned()
}

/// A secret string: shown as `***` by `Debug` and `Display`, and it cannot
/// be serialized (only read), so it never lands in a manifest or a log.
/// Zeroized when dropped.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a location could not be understood. Messages never repeat a
/// credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LocationError {
    #[error(
        "storage location {location:?} is not understood: use /abs/path, local:/abs/path or s3:http(s)://endpoint/bucket[/prefix]"
    )]
    UnknownScheme { location: String },
    #[error("local storage path {path:?} must be absolute")]
    RelativePath { path: String },
    #[error("s3 location {location:?} must name an http:// or https:// endpoint")]
    BadEndpoint { location: String },
    #[error(
        "s3 location names credentials in its url; give them in the config or via AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY instead"
    )]
    CredentialsInUrl,
    #[error("s3 location {location:?} names no bucket")]
    MissingBucket { location: String },
    #[error("s3 bucket name {bucket:?} is invalid: 1 to 255 of a-z, A-Z, 0-9, '.', '-', '_'")]
    BadBucket { bucket: String },
    #[error(
        "s3 prefix {prefix:?} is invalid: it must be /-separated names without '.', '..' or empty parts"
    )]
    BadPrefix { prefix: String },
    #[error("s3 credentials need both an access key id and a secret access key")]
    HalfCredentials,
    #[error("s3 part size {part_size} is below the 5 MiB minimum")]
    PartTooSmall { part_size: u64 },
    #[error("s3 tuning value {field} must be at least 1")]
    ZeroTuning { field: &'static str },
}

impl FromStr for StorageConfig {
    type Err = LocationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with('/') {
            return Ok(StorageConfig::Local { path: s.into() });
        }
        if let Some(path) = s.strip_prefix("local:") {
            if !path.starts_with('/') {
                return Err(LocationError::RelativePath {
                    path: path.to_owned(),
                });
            }
            return Ok(StorageConfig::Local { path: path.into() });
        }
        if let Some(url) = s.strip_prefix("s3:") {
            return parse_s3(url).map(|c| StorageConfig::S3(Box::new(c)));
        }
        Err(LocationError::UnknownScheme {
            location: redact_userinfo(s),
        })
    }
}

/// The location without anything between `://` and an `@`.
fn redact_userinfo(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(i), Some(j)) if j > i => format!("{}://***{}", &s[..i], &s[j..]),
        _ => s.to_owned(),
    }
}

fn parse_s3(url: &str) -> Result<S3Config, LocationError> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
        ("https", rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        ("http", rest)
    } else {
        return Err(LocationError::BadEndpoint {
            location: redact_userinfo(url),
        });
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.contains('@') {
        return Err(LocationError::CredentialsInUrl);
    }
    if authority.is_empty()
        || authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "?#".contains(c))
    {
        return Err(LocationError::BadEndpoint {
            location: url.to_owned(),
        });
    }
    let path = path.trim_end_matches('/');
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    if bucket.is_empty() {
        return Err(LocationError::MissingBucket {
            location: url.to_owned(),
        });
    }
    let config = S3Config {
        endpoint: Some(format!("{scheme}://{authority}")),
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        region: default_region(),
        path_style: None,
        access_key_id: None,
        secret_access_key: None,
        session_token: None,
        tuning: S3Tuning::default(),
    };
    config.validate()?;
    Ok(config)
}

impl S3Config {
    /// A config for `bucket` on `endpoint` with defaults for the rest.
    pub fn new(endpoint: impl Into<String>, bucket: impl Into<String>) -> Self {
        Self {
            endpoint: Some(endpoint.into()),
            bucket: bucket.into(),
            prefix: String::new(),
            region: default_region(),
            path_style: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            tuning: S3Tuning::default(),
        }
    }

    /// Sets explicit credentials.
    pub fn with_credentials(mut self, access_key_id: &str, secret_access_key: &str) -> Self {
        self.access_key_id = Some(access_key_id.to_owned());
        self.secret_access_key = Some(Secret::new(secret_access_key));
        self
    }

    /// Path-style addressing in effect.
    pub fn path_style(&self) -> bool {
        self.path_style.unwrap_or(self.endpoint.is_some())
    }

    /// Checks everything a config file could get wrong.
    pub fn validate(&self) -> Result<(), LocationError> {
        if let Some(endpoint) = &self.endpoint {
            let rest = endpoint
                .strip_prefix("https://")
                .or_else(|| endpoint.strip_prefix("http://"));
            match rest {
                Some(rest) if rest.contains('@') => return Err(LocationError::CredentialsInUrl),
                Some(rest) if !rest.is_empty() => {}
                _ => {
                    return Err(LocationError::BadEndpoint {
                        location: endpoint.clone(),
                    });
                }
            }
        }
        let bucket_ok = !self.bucket.is_empty()
            && self.bucket.len() <= 255
            && self
                .bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
        if !bucket_ok {
            return Err(LocationError::BadBucket {
                bucket: self.bucket.clone(),
            });
        }
        if !self.prefix.is_empty() && super::ObjectKey::new(self.prefix.clone()).is_err() {
            return Err(LocationError::BadPrefix {
                prefix: self.prefix.clone(),
            });
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(LocationError::HalfCredentials);
        }
        let t = &self.tuning;
        if t.part_size < MIN_PART_SIZE {
            return Err(LocationError::PartTooSmall {
                part_size: t.part_size,
            });
        }
        for (field, value) in [
            ("part_concurrency", t.part_concurrency as u64),
            ("max_idle_connections", t.max_idle_connections as u64),
        ] {
            if value == 0 {
                return Err(LocationError::ZeroTuning { field });
            }
        }
        Ok(())
    }
}

impl fmt::Display for StorageConfig {
    /// The command-line form; round-trips through `FromStr` (credentials and
    /// tuning are not part of it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageConfig::Local { path } => write!(f, "local:{}", path.display()),
            StorageConfig::S3(s3) => s3.fmt(f),
        }
    }
}

impl fmt::Display for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoint = self
            .endpoint
            .as_deref()
            .unwrap_or("https://s3.amazonaws.com");
        write!(f, "s3:{endpoint}/{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open;

    fn parse(s: &str) -> Result<StorageConfig, LocationError> {
        s.parse()
    }

    #[test]
    fn local_locations() {
        assert_eq!(
            parse("/var/backups/ferry"),
            Ok(StorageConfig::Local {
                path: "/var/backups/ferry".into()
            })
        );
        assert_eq!(
            parse("local:/srv/repo"),
            Ok(StorageConfig::Local {
                path: "/srv/repo".into()
            })
        );
        assert_eq!(
            parse("local:relative/dir"),
            Err(LocationError::RelativePath {
                path: "relative/dir".into()
            })
        );
        assert!(matches!(
            parse("relative/dir"),
            Err(LocationError::UnknownScheme { .. })
        ));
        assert!(matches!(
            parse(""),
            Err(LocationError::UnknownScheme { .. })
        ));
    }

    #[test]
    fn s3_locations() {
        let StorageConfig::S3(c) =
            parse("s3:http://127.0.0.1:8333/backups/team-a/app").expect("valid")
        else {
            panic!("not s3");
        };
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        assert_eq!(c.bucket, "backups");
        assert_eq!(c.prefix, "team-a/app");
        assert_eq!(c.region, "us-east-1");
        assert!(c.path_style());
        assert_eq!(c.access_key_id, None);

        let StorageConfig::S3(c) = parse("s3:https://minio.example:9000/b/").expect("valid") else {
            panic!("not s3");
        };
        assert_eq!(c.bucket, "b");
        assert_eq!(c.prefix, "");

        for bad in [
            "s3:ftp://host/b",
            "s3:host/b",
            "s3:http:///b",
            "s3:http://host",
            "s3:http://host/",
            "s3:http://host/b/../x",
            "s3:http://host/b//x",
            "s3:http://host/bad bucket",
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "local:/srv/repo",
            "s3:http://127.0.0.1:8333/backups",
            "s3:https://s3.example.com/b/p/q",
        ] {
            let c = parse(s).expect("valid");
            assert_eq!(c.to_string(), s);
            assert_eq!(parse(&c.to_string()), Ok(c));
        }
    }

    #[test]
    fn secrets_never_show() {
        // Credentials in a url are refused without repeating them.
        let err = parse("s3:http://AKID:hunter2secret@host/b").expect_err("refused");
        assert_eq!(err, LocationError::CredentialsInUrl);
        assert!(!err.to_string().contains("hunter2secret"));
        let err = parse("ftp://user:hunter2secret@host/b").expect_err("refused");
        assert!(!err.to_string().contains("hunter2secret"), "{err}");
        assert!(!format!("{err:?}").contains("hunter2secret"), "{err:?}");

        let c = S3Config::new("http://h:1", "b").with_credentials("AKID", "hunter2secret");
        let mut c2 = c.clone();
        c2.session_token = Some(Secret::new("tokentokentoken"));
        let config = StorageConfig::S3(Box::new(c2));
        for shown in [format!("{config:?}"), config.to_string(), format!("{c:#?}")] {
            assert!(!shown.contains("hunter2secret"), "{shown}");
            assert!(!shown.contains("tokentokentoken"), "{shown}");
        }
        assert!(format!("{config:?}").contains("***"));
    }

    #[test]
    fn config_files_round_trip_and_are_validated() {
        let json = r#"{"type":"s3","endpoint":"http://127.0.0.1:8333","bucket":"b",
            "prefix":"p","access_key_id":"AKID","secret_access_key":"s3cr3t",
            "tuning":{"part_size":6291456,"attempt_timeout":2.5}}"#;
        let config: StorageConfig = serde_json::from_str(json).expect("parses");
        let StorageConfig::S3(s3) = &config else {
            panic!("not s3")
        };
        assert_eq!(s3.region, DEFAULT_REGION);
        assert_eq!(s3.tuning.part_size, 6 << 20);
        assert_eq!(s3.tuning.attempt_timeout, Duration::from_millis(2500));
        assert_eq!(
            s3.tuning.part_concurrency,
            S3Tuning::default().part_concurrency
        );
        assert_eq!(
            s3.secret_access_key.as_ref().map(Secret::expose),
            Some("s3cr3t")
        );
        s3.validate().expect("valid");
        // Serialized, it keeps everything but the secret.
        let json = serde_json::to_string(&config).expect("serializes");
        assert!(!json.contains("s3cr3t"), "{json}");
        let back: StorageConfig = serde_json::from_str(&json).expect("parses back");
        let StorageConfig::S3(back) = back else {
            panic!("not s3")
        };
        assert_eq!(back.secret_access_key, None);
        assert_eq!(back.access_key_id, s3.access_key_id);
        assert_eq!(back.tuning, s3.tuning);

        let mut half = s3.clone();
        half.secret_access_key = None;
        assert_eq!(half.validate(), Err(LocationError::HalfCredentials));
        let mut small = s3.clone();
        small.tuning.part_size = 1 << 20;
        assert!(matches!(
            small.validate(),
            Err(LocationError::PartTooSmall { .. })
        ));
        let local: StorageConfig =
            serde_json::from_str(r#"{"type":"local","path":"/srv/x"}"#).expect("parses");
        assert_eq!(local.to_string(), "local:/srv/x");
        assert!(serde_json::from_str::<StorageConfig>(r#"{"type":"ftp"}"#).is_err());
    }

    #[tokio::test]
    async fn open_gives_working_stores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let weed = crate::testing::seaweed().await;
        let bucket = weed.new_bucket().await;
        let configs = [
            format!("local:{}", dir.path().display())
                .parse::<StorageConfig>()
                .expect("local"),
            StorageConfig::S3(Box::new(weed.config(&bucket, "via/open"))),
        ];
        for config in configs {
            let store = open(&config).await.expect("open");
            let key = crate::ObjectKey::new("k").expect("key");
            store
                .put(&key, bytes::Bytes::from_static(b"v"))
                .await
                .expect("put");
            assert_eq!(store.get(&key).await.expect("get"), &b"v"[..], "{config}");
        }
        let relative = StorageConfig::Local {
            path: "relative".into(),
        };
        let err = open(&relative).await.expect_err("relative path refused");
        assert!(err.to_string().contains("local:relative"), "{err}");
    }
}
