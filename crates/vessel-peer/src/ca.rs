//! The cluster CA and node certificates (ECDSA P-256).
//!
//! `vessel cluster init` makes the CA on the first node. A joining node makes its own key
//! and a certificate request ([`node_key_and_csr`]); the key never leaves it. The CA node
//! signs the request with the names it decides ([`issue`]): the node's name as a DNS name
//! and its address as an IP address, usable for both ends of mutual TLS.
//!
//! Files under `ROOT/cluster/` ([`ClusterFiles`]), PEM, 0600, each written atomically
//! (temporary file, fsync, rename, fsync of the directory):
//! ```text
//! ca.crt     the cluster CA certificate (every node)
//! ca.key     its key: only on nodes that may admit new ones (the first node)
//! node.crt   this node's certificate
//! node.key   this node's key
//! ```

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what}: {reason}")]
    Crypto { what: &'static str, reason: String },
    #[error("{path}: {error}")]
    File { path: PathBuf, error: std::io::Error },
    #[error("{0}")]
    Refused(String),
}

fn crypto(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |e| CaError::Crypto {
        what,
        reason: e.to_string(),
    }
}

/// How long certificates are valid. There is no rotation yet: long enough to outlive the
/// machines, and the CA outlives every node certificate it signs.
const CA_DAYS: i64 = 20 * 365;
const NODE_DAYS: i64 = 10 * 365;

fn validity(p: &mut CertificateParams, days: i64) {
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
    // An hour back: clocks of two machines differ a little.
    p.not_before = now - std::time::Duration::from_secs(3600);
    p.not_after = now + std::time::Duration::from_secs(days as u64 * 86_400);
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKey")
            .field("key_pem", &"<secret>")
            .finish_non_exhaustive()
    }
}

/// A new cluster CA. `cluster_id` goes into its name (to tell clusters apart in tools).
pub fn make_ca(cluster_id: &str) -> Result<CertKey, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto("the CA key"))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "vessel");
    dn.push(DnType::CommonName, format!("vessel cluster CA {cluster_id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, CA_DAYS);
    let cert = p.self_signed(&key).map_err(crypto("the CA certificate"))?;
    Ok(CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A node's key and a certificate request for `name` and `address` (made on the node
/// itself; the request goes to the CA node, the key stays).
pub fn node_key_and_csr(name: &str, address: IpAddr) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto("the node key"))?;
    let p = node_params(name, address)?;
    let csr = p.serialize_request(&key).map_err(crypto("the certificate request"))?;
    let pem = csr.pem().map_err(crypto("the certificate request"))?;
    Ok((key.serialize_pem(), pem))
}

fn node_params(name: &str, address: IpAddr) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "vessel");
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let dns = name
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Refused(format!("node name {name:?} is not a DNS name: {e}")))?;
    p.subject_alt_names = vec![SanType::DnsName(dns), SanType::IpAddress(address)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.is_ca = IsCa::ExplicitNoCa;
    validity(&mut p, NODE_DAYS);
    Ok(p)
}

/// Sign a node's certificate request. The request contributes only its public key (its
/// signature is checked: the requester holds the key); the names are the ones the CA
/// node decided, never what the request asked for.
pub fn issue(ca: &CertKey, csr_pem: &str, name: &str, address: IpAddr) -> Result<String, CaError> {
    if csr_pem.len() > 16 << 10 {
        return Err(CaError::Refused("the certificate request is over 16 KiB".into()));
    }
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CaError::Refused(format!("not a valid certificate request: {e}")))?;
    if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(CaError::Refused(
            "the certificate request's key is not ECDSA P-256".into(),
        ));
    }
    csr.params = node_params(name, address)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(crypto("the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(crypto("the CA certificate"))?;
    Ok(csr
        .signed_by(&issuer)
        .map_err(crypto("signing the node certificate"))?
        .pem())
}

/// The DER bytes of the first certificate in `pem`.
pub fn cert_der(pem: &str) -> Result<Vec<u8>, CaError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| CaError::Crypto {
            what: "reading a certificate",
            reason: e.to_string(),
        })
}

/// The pin of a CA certificate: SHA-256 of its DER bytes.
pub fn pin(ca_cert_pem: &str) -> Result<[u8; 32], CaError> {
    Ok(Sha256::digest(cert_der(ca_cert_pem)?).into())
}

/// A certificate's serial number (big-endian bytes), as a CRL names it.
pub fn serial(cert_pem: &str) -> Result<Vec<u8>, CaError> {
    let der = cert_der(cert_pem)?;
    let (_, c) = x509_parser::parse_x509_certificate(&der).map_err(|e| CaError::Crypto {
        what: "reading a certificate",
        reason: e.to_string(),
    })?;
    Ok(c.raw_serial().to_vec())
}

/// A certificate revocation list signed by the CA, naming `serials` (what the private
/// etcd's TLS listener reads: `--client-crl-file`). `number` only grows. Valid a year.
pub fn crl(ca: &CertKey, serials: &[Vec<u8>], number: u64) -> Result<String, CaError> {
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
    let p = rcgen::CertificateRevocationListParams {
        this_update: now - std::time::Duration::from_secs(3600),
        next_update: now + std::time::Duration::from_secs(365 * 86_400),
        crl_number: rcgen::SerialNumber::from(number.to_be_bytes().to_vec()),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(crypto("the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(crypto("the CA certificate"))?;
    p.signed_by(&issuer)
        .map_err(crypto("signing the revocation list"))?
        .pem()
        .map_err(crypto("the revocation list"))
}

/// A certificate's identity for revocation: the hex SHA-256 of its DER.
pub fn fingerprint(cert_pem: &str) -> Result<String, CaError> {
    Ok(hex::encode(Sha256::digest(cert_der(cert_pem)?)))
}

/// [`fingerprint`] of a certificate in DER.
pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The DNS names a certificate (DER) is issued for.
pub fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// The cluster's files of one node.
#[derive(Debug, Clone)]
pub struct ClusterFiles {
    pub dir: PathBuf,
}

impl ClusterFiles {
    /// `ROOT/cluster`.
    pub fn new(root: &Path) -> ClusterFiles {
        ClusterFiles {
            dir: root.join("cluster"),
        }
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.dir.join("node.crt")
    }
    pub fn node_key(&self) -> PathBuf {
        self.dir.join("node.key")
    }

    /// The node is in a cluster of several (it has the cluster's CA certificate).
    pub fn initialized(&self) -> bool {
        self.ca_cert().exists()
    }

    fn read(&self, p: PathBuf) -> Result<String, CaError> {
        std::fs::read_to_string(&p).map_err(|error| CaError::File { path: p, error })
    }

    pub fn load_ca_cert(&self) -> Result<String, CaError> {
        self.read(self.ca_cert())
    }

    /// The CA with its key, if this node may issue certificates.
    pub fn load_ca(&self) -> Result<Option<CertKey>, CaError> {
        if !self.ca_key().exists() {
            return Ok(None);
        }
        Ok(Some(CertKey {
            cert_pem: self.read(self.ca_cert())?,
            key_pem: self.read(self.ca_key())?,
        }))
    }

    pub fn load_node(&self) -> Result<CertKey, CaError> {
        Ok(CertKey {
            cert_pem: self.read(self.node_cert())?,
            key_pem: self.read(self.node_key())?,
        })
    }

    /// Save what makes the node a member: the node's certificate and key first, the CA
    /// certificate last (its presence is what [`Self::initialized`] checks), the CA key
    /// only when given.
    pub fn save(&self, ca_cert_pem: &str, ca_key_pem: Option<&str>, node: &CertKey) -> Result<(), CaError> {
        let file = |path: PathBuf| move |error| CaError::File { path, error };
        std::fs::create_dir_all(&self.dir).map_err(file(self.dir.clone()))?;
        std::fs::set_permissions(&self.dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(file(self.dir.clone()))?;
        write_atomic(&self.node_key(), node.key_pem.as_bytes()).map_err(file(self.node_key()))?;
        write_atomic(&self.node_cert(), node.cert_pem.as_bytes()).map_err(file(self.node_cert()))?;
        if let Some(k) = ca_key_pem {
            write_atomic(&self.ca_key(), k.as_bytes()).map_err(file(self.ca_key()))?;
        }
        write_atomic(&self.ca_cert(), ca_cert_pem.as_bytes()).map_err(file(self.ca_cert()))?;
        Ok(())
    }
}

/// Write `bytes` to `path` as a whole or not at all: 0600, fsynced, renamed over, and the
/// directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csr_is_signed_with_the_names_the_ca_decides() {
        let ca = make_ca("c1").unwrap();
        let (key, csr) = node_key_and_csr("asked-name", "10.0.0.9".parse().unwrap()).unwrap();
        let cert = issue(&ca, &csr, "node-b", "10.0.0.5".parse().unwrap()).unwrap();
        let der = cert_der(&cert).unwrap();
        assert_eq!(dns_names(&der), vec!["node-b"]);
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca_der = cert_der(&ca.cert_pem).unwrap();
        let (_, cax) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(x.issuer(), cax.subject());
        x.verify_signature(Some(cax.public_key())).expect("signed by the CA");
        // The certificate is for the requester's key.
        let k = KeyPair::from_pem(&key).unwrap();
        assert_eq!(x.public_key().subject_public_key.data.as_ref(), k.public_key_raw());
        assert!(cax.is_ca() && !x.is_ca());
    }

    #[test]
    fn bad_requests_are_refused() {
        let ca = make_ca("c1").unwrap();
        let ip = "10.0.0.5".parse().unwrap();
        for bad in ["", "garbage", &"x".repeat(20 << 10), &ca.cert_pem] {
            let e = issue(&ca, bad, "n", ip).unwrap_err();
            assert!(matches!(e, CaError::Refused(_)), "{e}");
        }
        // A request whose signature does not match its key.
        let (_, csr) = node_key_and_csr("n", ip).unwrap();
        let mut lines: Vec<String> = csr.lines().map(str::to_string).collect();
        let mid = lines.len() / 2;
        let l = &mut lines[mid];
        let c = if l.starts_with('A') { "B" } else { "A" };
        l.replace_range(0..1, c);
        assert!(issue(&ca, &lines.join("\n"), "n", ip).is_err());
    }

    #[test]
    fn files_are_private_and_whole() {
        let d = tempfile::tempdir().unwrap();
        let f = ClusterFiles::new(d.path());
        assert!(!f.initialized());
        let ca = make_ca("c1").unwrap();
        let (key, csr) = node_key_and_csr("a", "127.0.0.1".parse().unwrap()).unwrap();
        let node = CertKey {
            cert_pem: issue(&ca, &csr, "a", "127.0.0.1".parse().unwrap()).unwrap(),
            key_pem: key,
        };
        f.save(&ca.cert_pem, Some(&ca.key_pem), &node).unwrap();
        assert!(f.initialized());
        for p in [f.ca_cert(), f.ca_key(), f.node_cert(), f.node_key()] {
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p).unwrap().permissions());
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
        assert_eq!(f.load_ca().unwrap().unwrap().key_pem, ca.key_pem);
        assert_eq!(f.load_node().unwrap().cert_pem, node.cert_pem);
        assert_eq!(pin(&f.load_ca_cert().unwrap()).unwrap(), pin(&ca.cert_pem).unwrap());
        // No temporary files left.
        let names: Vec<_> = std::fs::read_dir(&f.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
    }
}
