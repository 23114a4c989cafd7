//! A storage location in an S3-compatible bucket (AWS, MinIO, SeaweedFS,
//! Garage, Aliyun OSS, …) through `aws-sdk-s3`.
//!
//! - Every request has a connect timeout and a per-attempt timeout, and is
//!   retried by the SDK's standard policy (exponential backoff with jitter)
//!   a bounded number of times.
//! - Objects above the multipart threshold are uploaded in parts, several at
//!   a time; each part is its own request and so is retried on its own. A
//!   failed or cancelled upload is aborted, so no partial object is ever
//!   visible and no object size limit applies.
//! - Checksums are computed only where the API requires them, which keeps
//!   plain-http servers (SeaweedFS, Garage) working.
//! - Errors map to [`StoreError::NotFound`], [`StoreError::Transient`]
//!   (timeouts, connection failures, 5xx, throttling) or
//!   [`StoreError::Permanent`] (access denied, no such bucket, bad request),
//!   naming the bucket and key and never a credential.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::location::S3Config;
use ferry_core::Chain;

use super::{ObjectInfo, ObjectKey, ObjectStore, StoreError};

/// Objects in one bucket, below an optional prefix.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
    multipart_threshold: u64,
    part_size: u64,
    part_concurrency: usize,
    /// For messages: `s3:endpoint/bucket[/prefix]`.
    location: String,
    /// Tests make this part number of every multipart upload fail.
    #[cfg(test)]
    fail_part: Option<i32>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Builds a client for `config`. Explicit credentials win; otherwise the
    /// standard AWS chain (environment, profile, …) provides them. Does not
    /// contact the server.
    pub async fn new(config: &S3Config) -> Result<Self, StoreError> {
        let location = config.to_string();
        config.validate().map_err(|e| StoreError::Permanent {
            op: "open",
            key: location.clone(),
            source: Box::new(e),
        })?;
        let t = &config.tuning;
        let http = aws_smithy_http_client::Builder::new()
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(t.max_idle_connections)
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(t.connect_timeout)
            .operation_attempt_timeout(t.attempt_timeout)
            .build();
        // Ferry retries every operation in one place (`retry.rs`).
        let retry = RetryConfig::disabled();

        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(config.region.clone()))
            .timeout_config(timeouts)
            .retry_config(retry);
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id,
                secret.expose(),
                config.session_token.as_ref().map(|t| t.expose().to_owned()),
                None,
                "ferry-config",
            ));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.path_style())
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // Per-attempt timeouts bound stalls; the grace-period based
            // protection would also cut slow but healthy part uploads.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let prefix = if config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", config.prefix.trim_end_matches('/'))
        };
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix,
            multipart_threshold: t.multipart_threshold,
            part_size: t.part_size,
            part_concurrency: t.part_concurrency,
            location,
            #[cfg(test)]
            fail_part: None,
        })
    }

    /// The bucket this store writes to.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket; an existing bucket owned by us is fine.
    pub async fn create_bucket(&self) -> Result<(), StoreError> {
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.error("create_bucket", "", e)),
        }
    }

    fn full_key(&self, key: &ObjectKey) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }

    /// Names the object in errors: `key in bucket b`.
    fn describe(&self, key: &str) -> String {
        if key.is_empty() {
            format!("bucket {}", self.bucket)
        } else {
            format!("{}{key} in bucket {}", self.prefix, self.bucket)
        }
    }

    /// Maps an SDK error: transient for anything a retry can fix,
    /// permanent otherwise. `NotFound` is handled by callers.
    fn error<E, R>(&self, op: &'static str, key: &str, err: SdkError<E, R>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + HttpStatus + 'static,
    {
        let key = self.describe(key);
        let (transient, detail) = classify(&err);
        if transient {
            StoreError::Transient {
                op,
                key,
                source: detail.into(),
            }
        } else {
            StoreError::Permanent {
                op,
                key,
                source: detail.into(),
            }
        }
    }

    fn permanent(&self, op: &'static str, key: &str, msg: String) -> StoreError {
        StoreError::Permanent {
            op,
            key: self.describe(key),
            source: msg.into(),
        }
    }

    async fn put_single(&self, key: &ObjectKey, data: Bytes) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_length(data.len() as i64)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| self.error("put", key.as_str(), e))?;
        Ok(())
    }

    async fn put_multipart(&self, key: &ObjectKey, data: Bytes) -> Result<(), StoreError> {
        let full_key = self.full_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .send()
            .await
            .map_err(|e| self.error("put", key.as_str(), e))?;
        let Some(upload_id) = created.upload_id else {
            return Err(self.permanent(
                "put",
                key.as_str(),
                "the server started a multipart upload without an upload id".into(),
            ));
        };
        // Aborts the upload if this future fails or is dropped before the
        // upload completes.
        let mut guard = AbortGuard {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: full_key.clone(),
            upload_id: Some(upload_id.clone()),
        };
        let part_size = usize::try_from(self.part_size).unwrap_or(usize::MAX);
        let parts = (0..data.len().div_ceil(part_size)).map(|i| {
            let start = i * part_size;
            let end = (start + part_size).min(data.len());
            (i as i32 + 1, data.slice(start..end))
        });
        let mut completed: Vec<CompletedPart> = futures::stream::iter(parts)
            .map(|(number, body)| {
                let full_key = &full_key;
                let upload_id = &upload_id;
                async move {
                    #[cfg(test)]
                    if self.fail_part == Some(number) {
                        return Err(self.permanent(
                            "put",
                            key.as_str(),
                            format!("injected failure of part {number}"),
                        ));
                    }
                    let out = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(full_key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .content_length(body.len() as i64)
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .map_err(|e| self.error("put", key.as_str(), e))?;
                    tracing::trace!(key = %key, part = number, "uploaded part");
                    Ok::<_, StoreError>(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(out.e_tag)
                            .build(),
                    )
                }
            })
            .buffer_unordered(self.part_concurrency)
            .try_collect()
            .await?;
        completed.sort_by_key(|p| p.part_number);
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.error("put", key.as_str(), e))?;
        guard.upload_id = None;
        Ok(())
    }

    /// Multipart uploads still in progress below this store's prefix, as
    /// `(key, upload id)`: what a failed upload would leave behind.
    pub async fn pending_uploads(&self) -> Result<Vec<(String, String)>, StoreError> {
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .send()
            .await
            .map_err(|e| self.error("list_uploads", "", e))?;
        Ok(out
            .uploads
            .unwrap_or_default()
            .into_iter()
            .map(|u| (u.key.unwrap_or_default(), u.upload_id.unwrap_or_default()))
            .collect())
    }
}

/// Aborts a multipart upload on drop unless disarmed, so a failed or
/// cancelled put leaves no parts behind.
struct AbortGuard {
    client: Client,
    bucket: String,
    key: String,
    upload_id: Option<String>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(bucket = %self.bucket, key = %self.key, "cannot abort a multipart upload outside a runtime");
            return;
        };
        let client = self.client.clone();
        let bucket = std::mem::take(&mut self.bucket);
        let key = std::mem::take(&mut self.key);
        runtime.spawn(async move {
            // A part still in flight when the first abort lands may make
            // the upload reappear (S3 says to abort again): abort until
            // the server says there is no such upload, for about half a
            // minute at most (a part in flight on a loaded machine may take
            // that long to land).
            let mut last_error = None;
            for attempt in 0..10u32 {
                if attempt > 0 {
                    let ms = (500 * u64::from(attempt)).min(5_000);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                match client
                    .abort_multipart_upload()
                    .bucket(&bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .send()
                    .await
                {
                    Ok(_) => {
                        tracing::debug!(bucket = %bucket, key = %key, attempt, "aborted multipart upload");
                        last_error = None;
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_upload()) => {
                        return;
                    }
                    Err(e) => last_error = Some(Chain(&e).to_string()),
                }
            }
            if let Some(error) = last_error {
                tracing::warn!(
                    bucket = %bucket,
                    key = %key,
                    error = %error,
                    "failed to abort multipart upload; the bucket may keep its parts until a lifecycle rule removes them"
                );
            }
        });
    }
}

/// The HTTP status of a raw response, when there was one.
trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// What went wrong with a request, without any credential in it.
#[derive(Debug)]
struct S3Failure(String);

impl fmt::Display for S3Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for S3Failure {}

/// Whether a retry can help, and a description.
fn classify<E, R>(err: &SdkError<E, R>) -> (bool, S3Failure)
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + HttpStatus + 'static,
{
    match err {
        SdkError::TimeoutError(_) => (true, S3Failure("request timed out".into())),
        // A refused or reset connection, a DNS failure, a timeout: worth a
        // retry. Anything else that stops a request from being sent (no
        // credentials found, a request the library calls the user's fault)
        // will fail the same way again.
        SdkError::DispatchFailure(d) => (
            d.is_io() || d.is_timeout(),
            S3Failure(format!("could not reach the server: {}", Chain(err))),
        ),
        SdkError::ResponseError(_) => (true, S3Failure(format!("bad response: {}", Chain(err)))),
        SdkError::ConstructionFailure(_) => (
            false,
            S3Failure(format!("could not build the request: {}", Chain(err))),
        ),
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status_code();
            let e = ctx.err();
            let code = e.code().unwrap_or("");
            let message = e.message().unwrap_or("");
            let transient = status >= 500
                || status == 429
                || status == 408
                || matches!(
                    code,
                    "SlowDown"
                        | "Throttling"
                        | "ThrottlingException"
                        | "RequestTimeout"
                        | "RequestTimeTooSkewed"
                        | "InternalError"
                        | "ServiceUnavailable"
                );
            let what = match (status, code) {
                (_, "NoSuchBucket") => "the bucket does not exist".to_owned(),
                (403, _) | (_, "AccessDenied") => "access denied".to_owned(),
                (_, "InvalidAccessKeyId") => "the access key id is not known".to_owned(),
                (_, "SignatureDoesNotMatch") => {
                    "the request signature does not match (wrong secret access key?)".to_owned()
                }
                _ => "the server refused the request".to_owned(),
            };
            let mut text = format!("{what} (http {status}");
            if !code.is_empty() {
                text.push_str(", ");
                text.push_str(code);
            }
            text.push(')');
            // Server messages repeat the request, never the secret; keep
            // them short anyway.
            if !message.is_empty() {
                text.push_str(": ");
                text.extend(message.chars().take(200));
            }
            (transient, S3Failure(text))
        }
        // A kind of failure this build does not know: assume a retry may
        // help. The retry deadline bounds what that assumption costs.
        _ => (true, S3Failure(Chain(err).to_string())),
    }
}

fn is_not_found<E: ProvideErrorMetadata, R: HttpStatus>(err: &SdkError<E, R>) -> bool {
    match err {
        SdkError::ServiceError(ctx) => {
            ctx.raw().status_code() == 404 && !matches!(ctx.err().code(), Some("NoSuchBucket"))
        }
        _ => false,
    }
}

/// Reads the whole body of a response; a connection lost midway is
/// transient.
async fn collect_body(
    store: &S3Store,
    op: &'static str,
    key: &ObjectKey,
    body: ByteStream,
) -> Result<Bytes, StoreError> {
    body.collect()
        .await
        .map(|d| d.into_bytes())
        .map_err(|e| StoreError::Transient {
            op,
            key: store.describe(key.as_str()),
            source: S3Failure(format!("reading the body failed: {}", Chain(&e))).into(),
        })
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StoreError> {
        if data.len() as u64 > self.multipart_threshold {
            self.put_multipart(key, data).await
        } else {
            self.put_single(key, data).await
        }
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StoreError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| {
                if is_not_found(&e) {
                    StoreError::NotFound { key: key.clone() }
                } else {
                    self.error("get", key.as_str(), e)
                }
            })?;
        let expected = out.content_length;
        let data = collect_body(self, "get", key, out.body).await?;
        if let Some(expected) = expected
            && expected != data.len() as i64
        {
            return Err(StoreError::Transient {
                op: "get",
                key: self.describe(key.as_str()),
                source: S3Failure(format!(
                    "the body ended after {} of {expected} bytes",
                    data.len()
                ))
                .into(),
            });
        }
        Ok(data)
    }

    async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<Bytes, StoreError> {
        if range.start >= range.end {
            // HTTP cannot ask for zero bytes; check the object instead.
            let size = self
                .size(key)
                .await?
                .ok_or_else(|| StoreError::NotFound { key: key.clone() })?;
            super::local::check_range(key, &range, size)?;
            return Ok(Bytes::new());
        }
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) if is_not_found(&e) => return Err(StoreError::NotFound { key: key.clone() }),
            Err(SdkError::ServiceError(ctx)) if ctx.raw().status_code() == 416 => {
                let size = self.size(key).await?.unwrap_or(0);
                super::local::check_range(key, &range, size)?;
                return Err(self.permanent(
                    "get_range",
                    key.as_str(),
                    format!("the server refused range {range:?}"),
                ));
            }
            Err(e) => return Err(self.error("get_range", key.as_str(), e)),
        };
        let data = collect_body(self, "get_range", key, out.body).await?;
        if data.len() as u64 != range.end - range.start {
            // The object is shorter than the range: report it as such.
            let total = out
                .content_range
                .as_deref()
                .and_then(|r| r.rsplit('/').next())
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(total) = total {
                super::local::check_range(key, &range, total)?;
            }
            return Err(StoreError::Transient {
                op: "get_range",
                key: self.describe(key.as_str()),
                source: S3Failure(format!(
                    "asked for {} bytes, got {}",
                    range.end - range.start,
                    data.len()
                ))
                .into(),
            });
        }
        Ok(data)
    }

    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.content_length.unwrap_or(0).max(0) as u64)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.error("size", key.as_str(), e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        super::validate_prefix(prefix)?;
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.error("list", prefix, e))?;
            for object in page.contents.unwrap_or_default() {
                let Some(full) = object.key else { continue };
                let Some(rel) = full.strip_prefix(&self.prefix) else {
                    continue;
                };
                match ObjectKey::new(rel) {
                    Ok(key) => out.push(ObjectInfo {
                        key,
                        size: object.size.unwrap_or(0).max(0) as u64,
                    }),
                    // Directory markers and foreign objects are not ours.
                    Err(_) => {
                        tracing::debug!(bucket = %self.bucket, key = %full, "skipping an object whose key is not a ferry key")
                    }
                }
            }
            match page.next_continuation_token {
                Some(next) if page.is_truncated == Some(true) => token = Some(next),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.error("delete", key.as_str(), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::RetryPolicy;
    use crate::conformance::{Fixture, LARGE_OBJECT, conformance_suite};
    use crate::testing::seaweed;

    mod conformance {
        use super::*;

        conformance_suite!(async {
            let weed = seaweed().await;
            let mut config = weed.config(&weed.new_bucket().await, "some/prefix");
            // Several parts for the large-object case.
            config.tuning.multipart_threshold = 8 << 20;
            config.tuning.part_size = 5 << 20;
            Fixture {
                store: Arc::new(S3Store::new(&config).await.expect("s3 store")),
                _guard: None,
            }
        });
    }

    fn key(s: &str) -> ObjectKey {
        ObjectKey::new(s).expect("valid key")
    }

    #[tokio::test]
    async fn prefixes_keep_stores_apart() {
        let weed = seaweed().await;
        let bucket = weed.new_bucket().await;
        let a = S3Store::new(&weed.config(&bucket, "a"))
            .await
            .expect("store");
        let ab = S3Store::new(&weed.config(&bucket, "a/b"))
            .await
            .expect("store");
        let whole = S3Store::new(&weed.config(&bucket, ""))
            .await
            .expect("store");
        a.put(&key("x"), Bytes::from_static(b"1"))
            .await
            .expect("put");
        ab.put(&key("x"), Bytes::from_static(b"2"))
            .await
            .expect("put");
        assert_eq!(ab.get(&key("x")).await.expect("get"), &b"2"[..]);
        assert_eq!(a.get(&key("b/x")).await.expect("get"), &b"2"[..]);
        let mut all: Vec<_> = whole
            .list("")
            .await
            .expect("list")
            .into_iter()
            .map(|i| i.key.to_string())
            .collect();
        all.sort();
        assert_eq!(all, ["a/b/x", "a/x"]);
        assert_eq!(ab.list("").await.expect("list").len(), 1);
    }

    #[tokio::test]
    async fn multipart_upload_leaves_no_pending_upload() {
        let weed = seaweed().await;
        let mut config = weed.config(&weed.new_bucket().await, "mp");
        config.tuning.multipart_threshold = 5 << 20;
        config.tuning.part_size = 5 << 20;
        let store = S3Store::new(&config).await.expect("store");
        let data = crate::conformance::pattern(LARGE_OBJECT / 2 + 1, 9);
        store.put(&key("big"), data.clone()).await.expect("put");
        assert!(store.get(&key("big")).await.expect("get") == data);
        assert_eq!(store.pending_uploads().await.expect("uploads"), vec![]);
    }

    #[tokio::test]
    async fn a_failed_multipart_upload_is_aborted() {
        // The bucket does not exist: the upload cannot start, and the error
        // says so, permanently.
        let weed = seaweed().await;
        let mut config = weed.config("no-such-bucket-here", "");
        config.tuning.multipart_threshold = 5 << 20;
        config.tuning.part_size = 5 << 20;
        let store = S3Store::new(&config).await.expect("store");
        let err = store
            .put(&key("big"), crate::conformance::pattern(11 << 20, 1))
            .await
            .expect_err("no bucket");
        assert!(matches!(err, StoreError::Permanent { .. }), "{err}");
        let text = format!("{err} / {:?}", std::error::Error::source(&err));
        assert!(text.contains("no-such-bucket-here"), "{text}");
        assert!(text.contains("bucket does not exist"), "{text}");

        // A part that fails after others went up: the upload is aborted
        // and nothing is left pending or visible.
        let mut config = weed.config(&weed.new_bucket().await, "");
        config.tuning.multipart_threshold = 5 << 20;
        config.tuning.part_size = 5 << 20;
        config.tuning.part_concurrency = 1;
        let mut store = S3Store::new(&config).await.expect("store");
        // The server does list pending uploads (else the check below proves
        // nothing).
        let started = store
            .client
            .create_multipart_upload()
            .bucket(store.bucket())
            .key("probe")
            .send()
            .await
            .expect("start upload");
        let pending = store.pending_uploads().await.expect("uploads");
        assert_eq!(pending.len(), 1, "{pending:?}");
        store
            .client
            .abort_multipart_upload()
            .bucket(store.bucket())
            .key("probe")
            .set_upload_id(started.upload_id)
            .send()
            .await
            .expect("abort");
        store.fail_part = Some(3);
        let err = store
            .put(&key("failed"), crate::conformance::pattern(16 << 20, 2))
            .await
            .expect_err("part 3 fails");
        assert!(err.to_string().contains("failed"), "{err}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !store.pending_uploads().await.expect("uploads").is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the failed upload was never aborted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(store.size(&key("failed")).await.expect("size"), None);
        assert!(store.list("").await.expect("list").is_empty());

        // The same store without the fault uploads the object whole.
        store.fail_part = None;
        let data = crate::conformance::pattern(16 << 20, 3);
        store.put(&key("failed"), data.clone()).await.expect("put");
        assert!(store.get(&key("failed")).await.expect("get") == data);
    }

    #[tokio::test]
    async fn wrong_credentials_are_permanent_and_do_not_show_the_secret() {
        let weed = seaweed().await;
        let bucket = weed.new_bucket().await;
        for (id, secret) in [
            (crate::testing::ACCESS_KEY, "wrong-secret-VERY-SECRET"),
            ("NOSUCHKEYID", "another-secret-VERY-SECRET"),
        ] {
            let config = weed.config(&bucket, "").with_credentials(id, secret);
            let store = S3Store::new(&config).await.expect("store");
            for err in [
                store
                    .put(&key("x"), Bytes::from_static(b"x"))
                    .await
                    .expect_err("refused"),
                store.get(&key("x")).await.expect_err("refused"),
                store.list("").await.expect_err("refused"),
            ] {
                assert!(matches!(err, StoreError::Permanent { .. }), "{err}");
                let shown = format!(
                    "{err} {err:?} {}",
                    std::error::Error::source(&err)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                );
                assert!(!shown.contains(secret), "{shown}");
                assert!(shown.contains(&bucket), "{shown}");
                assert!(!format!("{store:?} {config:?}").contains(secret));
            }
        }
    }

    /// A put dropped mid-upload (its job cancelled) aborts its multipart
    /// upload: nothing is left pending or visible.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_multipart_upload_is_aborted() {
        let weed = seaweed().await;
        let mut config = weed.config(&weed.new_bucket().await, "");
        config.tuning.multipart_threshold = 5 << 20;
        config.tuning.part_size = 5 << 20;
        config.tuning.part_concurrency = 1;
        let store = Arc::new(S3Store::new(&config).await.expect("store"));
        let put = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .put(&key("cancelled"), crate::conformance::pattern(60 << 20, 4))
                    .await
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while store.pending_uploads().await.expect("uploads").is_empty() {
            assert!(
                !put.is_finished(),
                "the upload finished before it could be cancelled"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "the upload never started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        put.abort();
        assert!(put.await.expect_err("aborted").is_cancelled());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !store.pending_uploads().await.expect("uploads").is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cancelled upload was never aborted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(store.size(&key("cancelled")).await.expect("size"), None);
    }

    fn retry_for(deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            deadline: Duration::from_millis(deadline_ms),
        }
    }

    /// Opens `config` the way Ferry does: through the one retry layer.
    async fn open_s3(config: S3Config) -> Arc<dyn ObjectStore> {
        crate::open(&crate::StorageConfig::S3(Box::new(config)))
            .await
            .expect("open")
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_retried_until_the_deadline_in_one_line() {
        // A port nobody listens on: connections are refused.
        let port = crate::testing::free_port();
        let mut config =
            S3Config::new(format!("http://127.0.0.1:{port}"), "b").with_credentials("id", "secret");
        config.tuning.retry = retry_for(1_500);
        let store = open_s3(config).await;
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(60), store.get(&key("x")))
            .await
            .expect("bounded by the retry deadline")
            .expect_err("unreachable");
        assert!(started.elapsed() >= Duration::from_millis(1_000), "retried");
        assert!(err.is_transient(), "{err}");
        let text = err.to_string();
        assert!(text.contains("gave up after"), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
        // Not the client library's debug dump.
        for dump in ["DispatchFailure {", "ConnectorError {", "source: "] {
            assert!(!text.contains(dump), "{text}");
        }
    }

    #[tokio::test]
    async fn silent_endpoint_is_bounded_by_attempt_timeout_and_deadline() {
        // A server that accepts connections and never answers: the attempt
        // timeout ends each try, the deadline ends the operation.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = S3Config::new(format!("http://{addr}"), "b").with_credentials("id", "s");
        config.tuning.retry = retry_for(1_500);
        config.tuning.attempt_timeout = Duration::from_millis(400);
        let store = open_s3(config).await;
        for op in ["size", "put"] {
            let fut = async {
                match op {
                    "size" => store.size(&key("x")).await.map(|_| ()),
                    _ => store.put(&key("x"), Bytes::from_static(b"data")).await,
                }
            };
            let err = tokio::time::timeout(Duration::from_secs(60), fut)
                .await
                .expect("bounded by the attempt timeout and the deadline")
                .expect_err("silent server");
            assert!(err.is_transient(), "{op}: {err}");
            assert!(err.to_string().contains("timed out"), "{op}: {err}");
        }
        drop(listener);
    }

    /// A short outage of the endpoint (connections refused, then a working
    /// server on the same port) does not fail an operation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_outage_is_ridden_out() {
        let weed = seaweed().await;
        let bucket = weed.new_bucket().await;
        // A first write straight to the server: SeaweedFS answers 500 while
        // it allocates a new bucket's first volume, which on a busy machine
        // took half a minute; that is not the outage this test is about.
        let direct = open_s3(weed.config(&bucket, "warm")).await;
        direct
            .put(&key("w"), Bytes::from_static(b"warm"))
            .await
            .expect("the bucket takes writes");
        let target = weed.endpoint().trim_start_matches("http://").to_owned();
        let port = crate::testing::free_port();
        let mut config = weed.config(&bucket, "outage");
        config.endpoint = Some(format!("http://127.0.0.1:{port}"));
        config.tuning.retry = retry_for(30_000);
        let store = open_s3(config).await;
        // The proxy comes up after a while; until then nothing listens.
        let proxy = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind the proxy port");
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        let data = Bytes::from_static(b"survives an outage");
        store
            .put(&key("o"), data.clone())
            .await
            .expect("put rides out the outage");
        assert_eq!(store.get(&key("o")).await.expect("get"), data);
        proxy.abort();
    }
}
