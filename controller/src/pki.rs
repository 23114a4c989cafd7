//! The controller's certificate authority.
//!
//! `init` creates, under the data directory:
//!
//! ```text
//! pki/ca.crt  pki/ca.key          the Ferry CA (key 0600)
//! pki/server.crt pki/server.key   the controller's TLS certificate (key 0600)
//! operator/ca.crt operator/operator.crt operator/operator.key
//!                                 the first operator's client identity
//! ```
//!
//! The data directory (when `init` creates it), `pki/` and `operator/` are
//! 0700 and the keys 0600, whatever the umask.
//!
//! Agents get certificates from [`Pki::sign_agent_csr`]: only the CSR's
//! public key is used; subject, SANs, validity and key usages are set here.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::identity::PeerIdentity;
use ferry_proto::tls::CaFingerprint;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::catalog::{ClusterName, NodeName};
use crate::config;

/// Validity of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of the controller's server certificate.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Validity of agent and operator certificates.
pub const CLIENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long in the past to tolerate clock skew.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("pki directory {} already holds a ca; refusing to overwrite it", path.display())]
    AlreadyInitialised { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what} in {}: {reason}", path.display())]
    InvalidFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr { reason: String },
    #[error("invalid subject alternative name {value:?}: {reason}")]
    InvalidSan { value: String, reason: String },
    #[error("cannot issue the {what} certificate: {reason}")]
    Issue { what: &'static str, reason: String },
}

impl ferry_core::CodedError for PkiError {
    fn code(&self) -> ferry_core::ErrorCode {
        use ferry_core::ErrorCode;
        match self {
            Self::InvalidCsr { .. } | Self::InvalidSan { .. } => ErrorCode::InvalidArgument,
            Self::AlreadyInitialised { .. } => ErrorCode::AlreadyExists,
            Self::Read { .. }
            | Self::Write { .. }
            | Self::InvalidFile { .. }
            | Self::Issue { .. } => ErrorCode::Internal,
        }
    }
}

/// Paths of the files `init` writes.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub pki_dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub operator_dir: PathBuf,
    pub operator_ca: PathBuf,
    pub operator_cert: PathBuf,
    pub operator_key: PathBuf,
}

impl PkiPaths {
    pub fn new(data_dir: &Path) -> Self {
        let pki = data_dir.join("pki");
        let op = data_dir.join("operator");
        Self {
            ca_cert: pki.join("ca.crt"),
            ca_key: pki.join("ca.key"),
            server_cert: pki.join("server.crt"),
            server_key: pki.join("server.key"),
            operator_ca: op.join("ca.crt"),
            operator_cert: op.join("operator.crt"),
            operator_key: op.join("operator.key"),
            operator_dir: op,
            pki_dir: pki,
        }
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    /// Hex of the serial number.
    pub serial: String,
    /// `sha256:<hex>` of the certificate DER.
    pub fingerprint: String,
    pub not_after_unix_ms: i64,
}

/// The loaded CA plus the controller's server identity.
pub struct Pki {
    ca_cert_pem: String,
    ca_key: KeyPair,
    fingerprint: CaFingerprint,
    server_cert_pem: String,
    server_key_pem: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca_fingerprint", &self.fingerprint.to_string())
            .finish_non_exhaustive()
    }
}

/// Default server SANs: localhost, 127.0.0.1, ::1 and the host name.
pub fn default_sans() -> Vec<String> {
    let mut sans = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() && !sans.iter().any(|s| s == host) {
            sans.push(host.to_owned());
        }
    }
    sans
}

fn san_of(value: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !ok {
        return Err(PkiError::InvalidSan {
            value: value.to_owned(),
            reason: "expected an ip address or a dns name".to_owned(),
        });
    }
    let name = value
        .to_owned()
        .try_into()
        .map_err(|e: rcgen::Error| PkiError::InvalidSan {
            value: value.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(SanType::DnsName(name))
}

fn uri_san(uri: String) -> Result<SanType, PkiError> {
    let value = uri.clone();
    uri.try_into()
        .map(SanType::URI)
        .map_err(|e: rcgen::Error| PkiError::InvalidSan {
            value,
            reason: e.to_string(),
        })
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + valid_for;
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn cn(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ferry");
    dn.push(DnType::CommonName, name);
    dn
}

fn client_params(
    identity: &PeerIdentity,
    common_name: &str,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = cn(common_name);
    params.subject_alt_names = vec![uri_san(identity.to_uri())?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    validity(&mut params, CLIENT_VALIDITY);
    Ok(params)
}

/// Writes a file that must not exist yet, with the given mode.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Pki {
    /// Creates the CA, the server certificate (with `sans`) and the first
    /// operator identity `operator`. Refuses to touch an initialised
    /// directory.
    pub fn init(data_dir: &Path, sans: &[String], operator: &str) -> Result<Self, PkiError> {
        let paths = PkiPaths::new(data_dir);
        for p in [&paths.ca_key, &paths.ca_cert, &paths.operator_key] {
            if p.exists() {
                return Err(PkiError::AlreadyInitialised { path: p.clone() });
            }
        }
        let issue = |what: &'static str| {
            move |e: rcgen::Error| PkiError::Issue {
                what,
                reason: e.to_string(),
            }
        };

        // CA
        let ca_key = KeyPair::generate().map_err(issue("ca"))?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = cn("Ferry CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params.serial_number = Some(random_serial());
        validity(&mut ca_params, CA_VALIDITY);
        let ca_cert = ca_params.self_signed(&ca_key).map_err(issue("ca"))?;
        let issuer = Issuer::new(ca_params, &ca_key);

        // server
        let server_key = KeyPair::generate().map_err(issue("server"))?;
        let mut server_params = CertificateParams::default();
        server_params.distinguished_name = cn("Ferry controller");
        server_params.subject_alt_names =
            sans.iter().map(|s| san_of(s)).collect::<Result<_, _>>()?;
        server_params.is_ca = IsCa::ExplicitNoCa;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.use_authority_key_identifier_extension = true;
        server_params.serial_number = Some(random_serial());
        validity(&mut server_params, SERVER_VALIDITY);
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .map_err(issue("server"))?;

        // first operator
        let op_identity = PeerIdentity::Operator {
            name: operator.to_owned(),
        };
        PeerIdentity::from_uri(&op_identity.to_uri()).map_err(|_| PkiError::Issue {
            what: "operator",
            reason: format!("invalid operator name {operator:?}"),
        })?;
        let op_key = KeyPair::generate().map_err(issue("operator"))?;
        let op_cert = client_params(&op_identity, operator)?
            .signed_by(&op_key, &issuer)
            .map_err(issue("operator"))?;

        let ca_pem = ca_cert.pem();
        let dir_err = |path: &Path| {
            let path = path.to_owned();
            move |source| PkiError::Write { path, source }
        };
        config::prepare_data_dir(data_dir).map_err(dir_err(data_dir))?;
        for dir in [&paths.pki_dir, &paths.operator_dir] {
            config::private_dir(dir).map_err(dir_err(dir))?;
        }
        write_new(&paths.ca_key, &ca_key.serialize_pem(), 0o600)?;
        write_new(&paths.ca_cert, &ca_pem, 0o644)?;
        write_new(&paths.server_key, &server_key.serialize_pem(), 0o600)?;
        write_new(&paths.server_cert, &server_cert.pem(), 0o644)?;
        write_new(&paths.operator_key, &op_key.serialize_pem(), 0o600)?;
        write_new(&paths.operator_cert, &op_cert.pem(), 0o644)?;
        write_new(&paths.operator_ca, &ca_pem, 0o644)?;
        Self::load(data_dir)
    }

    /// Loads an initialised PKI directory.
    pub fn load(data_dir: &Path) -> Result<Self, PkiError> {
        let paths = PkiPaths::new(data_dir);
        let ca_cert_pem = read(&paths.ca_cert)?;
        let ca_key =
            KeyPair::from_pem(&read(&paths.ca_key)?).map_err(|e| PkiError::InvalidFile {
                what: "ca key",
                path: paths.ca_key.clone(),
                reason: e.to_string(),
            })?;
        let fingerprint =
            CaFingerprint::of_pem(&ca_cert_pem).map_err(|e| PkiError::InvalidFile {
                what: "ca certificate",
                path: paths.ca_cert.clone(),
                reason: e.to_string(),
            })?;
        // Check the CA certificate parses as an issuer now, not at first use.
        Issuer::from_ca_cert_pem(&ca_cert_pem, &ca_key).map_err(|e| PkiError::InvalidFile {
            what: "ca certificate",
            path: paths.ca_cert.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            ca_cert_pem,
            ca_key,
            fingerprint,
            server_cert_pem: read(&paths.server_cert)?,
            server_key_pem: read(&paths.server_key)?,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    pub fn ca_fingerprint(&self) -> &CaFingerprint {
        &self.fingerprint
    }

    /// The server certificate followed by the CA certificate: agents that
    /// pin the CA fingerprint find the CA in this chain.
    pub fn server_chain_pem(&self) -> String {
        format!("{}{}", self.server_cert_pem, self.ca_cert_pem)
    }

    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Issuer::from_ca_cert_pem(&self.ca_cert_pem, &self.ca_key).map_err(|e| PkiError::Issue {
            what: "client",
            reason: e.to_string(),
        })
    }

    fn sign(
        &self,
        what: &'static str,
        params: &CertificateParams,
        key: &impl PublicKeyData,
    ) -> Result<Issued, PkiError> {
        let cert = params
            .signed_by(key, &self.issuer()?)
            .map_err(|e| PkiError::Issue {
                what,
                reason: e.to_string(),
            })?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: params
                .serial_number
                .as_ref()
                .map(|s| hex::encode(s.to_bytes()))
                .unwrap_or_default(),
            fingerprint: CaFingerprint::of_der(cert.der()).to_string(),
            not_after_unix_ms: unix_ms(params.not_after),
        })
    }

    /// Issues an agent certificate for the public key of `csr_pem`. The
    /// CSR's subject and extensions are ignored; the signature over it must
    /// verify.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        cluster: &ClusterName,
        node: &NodeName,
    ) -> Result<Issued, PkiError> {
        let csr = parse_csr(csr_pem)?;
        let identity = PeerIdentity::Agent {
            cluster: cluster.to_string(),
            node: node.to_string(),
        };
        let params = client_params(&identity, node.as_str())?;
        self.sign("agent", &params, &csr.public_key)
    }

    /// Issues an operator certificate for `key` (used by `init` and tests).
    pub fn issue_operator(&self, name: &str, key: &KeyPair) -> Result<Issued, PkiError> {
        let identity = PeerIdentity::Operator {
            name: name.to_owned(),
        };
        let params = client_params(&identity, name)?;
        self.sign("operator", &params, key)
    }
}

/// Parses a CSR and verifies its self-signature, so only the holder of the
/// private key gets a certificate for it.
pub fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, PkiError> {
    if csr_pem.len() > 16 * 1024 {
        return Err(PkiError::InvalidCsr {
            reason: "larger than 16 KiB".to_owned(),
        });
    }
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::InvalidCsr {
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> (ClusterName, NodeName) {
        (
            ClusterName::new("prod").expect("valid"),
            NodeName::new("node-1").expect("valid"),
        )
    }

    #[test]
    fn init_writes_private_keys_0600_and_refuses_a_second_time() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::init(dir.path(), &default_sans(), "admin").expect("init");
        let paths = PkiPaths::new(dir.path());
        for key in [&paths.ca_key, &paths.server_key, &paths.operator_key] {
            let mode = std::fs::metadata(key).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
            assert!(read(key).expect("read").contains("PRIVATE KEY"));
        }
        let op = std::fs::read(&paths.operator_cert).expect("operator cert");
        let der =
            ferry_proto::tls::first_cert_der(&String::from_utf8_lossy(&op), "op").expect("pem");
        assert_eq!(
            PeerIdentity::from_cert_der(der.as_ref()).expect("identity"),
            PeerIdentity::Operator {
                name: "admin".into()
            }
        );
        assert_eq!(
            CaFingerprint::of_pem(&read(&paths.operator_ca).expect("ca")).expect("fp"),
            *pki.ca_fingerprint()
        );
        let before = read(&paths.ca_key).expect("ca key");
        let again = Pki::init(dir.path(), &default_sans(), "admin");
        assert!(matches!(again, Err(PkiError::AlreadyInitialised { .. })));
        assert_eq!(read(&paths.ca_key).expect("ca key"), before);
    }

    #[test]
    fn agent_certificates_carry_the_controllers_names_not_the_csrs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::init(dir.path(), &["127.0.0.1".to_owned()], "admin").expect("init");
        let key = KeyPair::generate().expect("key");
        // The CSR asks for another cluster: it must be ignored.
        let mut req = CertificateParams::new(Vec::<String>::new()).expect("params");
        req.subject_alt_names = vec![uri_san("ferry://cluster/other/node/x".into()).expect("uri")];
        let csr = req
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let (cluster, node) = names();
        let issued = pki.sign_agent_csr(&csr, &cluster, &node).expect("sign");
        let der = ferry_proto::tls::first_cert_der(&issued.cert_pem, "agent").expect("pem");
        assert_eq!(
            PeerIdentity::from_cert_der(der.as_ref()).expect("identity"),
            PeerIdentity::Agent {
                cluster: "prod".into(),
                node: "node-1".into()
            }
        );
        assert!(issued.fingerprint.starts_with("sha256:"));
        assert!(issued.not_after_unix_ms > unix_ms(OffsetDateTime::now_utc()));
    }

    #[test]
    fn garbage_and_tampered_csrs_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::init(dir.path(), &["localhost".to_owned()], "admin").expect("init");
        let (cluster, node) = names();
        for bad in [
            "",
            "not a csr",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let err = pki.sign_agent_csr(bad, &cluster, &node).expect_err(bad);
            assert!(matches!(err, PkiError::InvalidCsr { .. }), "{err}");
        }
        let key = KeyPair::generate().expect("key");
        let csr = CertificateParams::new(vec!["a.example".to_owned()])
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        let mut der = csr.der().to_vec();
        let last = der.len() - 1;
        der[last] ^= 0xff; // break the signature
        let pem = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64_lines(&der)
        );
        let err = pki
            .sign_agent_csr(&pem, &cluster, &node)
            .expect_err("tampered");
        assert!(matches!(err, PkiError::InvalidCsr { .. }), "{err}");
    }

    #[test]
    fn bad_sans_are_refused() {
        assert!(san_of("10.0.0.1").is_ok());
        assert!(san_of("ferry.example.com").is_ok());
        for bad in ["", "a b", "a..b", "x/y"] {
            assert!(
                matches!(san_of(bad), Err(PkiError::InvalidSan { .. })),
                "{bad:?}"
            );
        }
    }

    fn base64_lines(der: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
