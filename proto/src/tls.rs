//! Client-side TLS for everything that talks to the controller (agents,
//! ferryctl, tests): mTLS channels verified against the Ferry CA, and the
//! fingerprint-pinned channel an agent uses to enrol before it has the CA.
//!
//! Pinning works inside one TLS handshake: the controller sends its server
//! certificate followed by the CA certificate. [`PinnedCaVerifier`] looks
//! for the certificate of the chain whose SHA-256 fingerprint equals the
//! pin, and then verifies the server certificate against that CA alone with
//! rustls' WebPKI verifier (signature, validity, name). A chain without the
//! pinned CA, or a server certificate the CA did not sign, fails the
//! handshake; nothing is read from an unverified connection.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long a connection attempt may take before it fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid controller url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("controller url {url:?} must use https (Ferry speaks mTLS only)")]
    NotHttps { url: String },
    #[error("invalid ca fingerprint {value:?}: expected sha256:<64 hex digits>")]
    InvalidFingerprint { value: String },
    #[error("no certificate found in {what} pem")]
    NoCertificate { what: &'static str },
    #[error("invalid {what} pem: {reason}")]
    InvalidPem { what: &'static str, reason: String },
    /// Network trouble or a controller that is down: a retry may help.
    #[error("cannot connect to controller {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("tls configuration for {url} failed: {source}")]
    Config {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

impl ferry_core::CodedError for TlsError {
    fn code(&self) -> ferry_core::ErrorCode {
        use ferry_core::ErrorCode;
        match self {
            TlsError::Connect { .. } => ErrorCode::Unavailable,
            TlsError::Config { .. } => ErrorCode::FailedPrecondition,
            TlsError::InvalidUrl { .. }
            | TlsError::NotHttps { .. }
            | TlsError::InvalidFingerprint { .. }
            | TlsError::NoCertificate { .. }
            | TlsError::InvalidPem { .. } => ErrorCode::InvalidArgument,
        }
    }
}

/// `sha256:<hex>` of a certificate's DER: how operators and agents name the
/// Ferry CA.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CaFingerprint([u8; 32]);

impl CaFingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// The fingerprint of the first certificate of a PEM document.
    pub fn of_pem(pem: &str) -> Result<Self, TlsError> {
        let der = first_cert_der(pem, "ca certificate")?;
        Ok(Self::of_der(der.as_ref()))
    }

    /// Parses `sha256:<64 hex digits>` (case-insensitive hex; `:` separators
    /// between bytes are accepted too).
    pub fn parse(value: &str) -> Result<Self, TlsError> {
        let invalid = || TlsError::InvalidFingerprint {
            value: value.to_owned(),
        };
        let hex_part = value.strip_prefix("sha256:").ok_or_else(invalid)?;
        let cleaned: String = hex_part.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(cleaned).map_err(|_| invalid())?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| invalid())?;
        Ok(Self(arr))
    }

    pub fn matches_der(&self, der: &[u8]) -> bool {
        Self::of_der(der) == *self
    }
}

impl std::fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl std::str::FromStr for CaFingerprint {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The DER of the first certificate in a PEM document.
pub fn first_cert_der(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, TlsError> {
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(TlsError::InvalidPem {
            what,
            reason: e.to_string(),
        }),
        None => Err(TlsError::NoCertificate { what }),
    }
}

fn endpoint_for(url: &str) -> Result<Endpoint, TlsError> {
    if !url.starts_with("https://") {
        return Err(TlsError::NotHttps {
            url: url.to_owned(),
        });
    }
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| TlsError::InvalidUrl {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

/// An mTLS endpoint: the server must present a certificate of the CA in
/// `ca_pem`; the client presents `cert_pem` / `key_pem`. Nothing is dialled
/// until the endpoint is connected.
pub fn endpoint(
    url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Endpoint, TlsError> {
    first_cert_der(ca_pem, "ca certificate")?;
    first_cert_der(cert_pem, "client certificate")?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem));
    endpoint_for(url)?
        .tls_config(tls)
        .map_err(|source| TlsError::Config {
            url: url.to_owned(),
            source,
        })
}

/// Connects an mTLS channel to the controller (see [`endpoint`]).
pub async fn channel(
    url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Channel, TlsError> {
    endpoint(url, ca_pem, cert_pem, key_pem)?
        .connect()
        .await
        .map_err(|source| TlsError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// A channel without a client certificate whose server must chain to the
/// CA with fingerprint `pin` (see the module docs). Used by `ferry-agent
/// join`, and by tests that check refusals of certificate-less clients.
pub async fn pinned_channel(url: &str, pin: &CaFingerprint) -> Result<Channel, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier::new(pin.clone()));
    endpoint_for(url)?
        .tls_config_with_verifier(ClientTlsConfig::new(), verifier)
        .map_err(|source| TlsError::Config {
            url: url.to_owned(),
            source,
        })?
        .connect()
        .await
        .map_err(|source| TlsError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// A rustls server verifier that trusts exactly the CA with a given
/// fingerprint, taken from the chain the server presents.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: CaFingerprint,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn new(pin: CaFingerprint) -> Self {
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        Self { pin, provider }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| self.pin.matches_der(c.as_ref()))
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the controller's certificate chain does not contain the pinned ca {}",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| {
            rustls::Error::General(format!("pinned ca {} is invalid: {e}", self.pin))
        })?;
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| !self.pin.matches_der(c.as_ref()))
            .cloned()
            .collect();
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("pinned ca verifier: {e}")))?;
        webpki.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_and_rejects_garbage() {
        let fp = CaFingerprint::of_der(b"not really a certificate");
        let text = fp.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), "sha256:".len() + 64);
        assert_eq!(CaFingerprint::parse(&text).ok(), Some(fp.clone()));
        assert_eq!(
            CaFingerprint::parse(&text.to_uppercase().replace("SHA256:", "sha256:")).ok(),
            Some(fp)
        );
        for bad in [
            "",
            "sha256:",
            "md5:00",
            "sha256:zz",
            &text[..text.len() - 2],
        ] {
            assert!(CaFingerprint::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn plain_http_urls_are_refused() {
        let err = endpoint("http://127.0.0.1:1", "x", "y", "z").err();
        assert!(
            matches!(
                err,
                Some(TlsError::NoCertificate { .. } | TlsError::NotHttps { .. })
            ),
            "{err:?}"
        );
        assert!(matches!(
            endpoint_for("http://127.0.0.1:1"),
            Err(TlsError::NotHttps { .. })
        ));
    }
}
