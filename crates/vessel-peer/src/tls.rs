//! rustls configurations (TLS 1.3 only, the `ring` provider).
//!
//! * The server presents its node certificate with the CA certificate behind it (a joiner
//!   finds the CA there and compares it with the token's pin). It asks every client for a
//!   certificate signed by the cluster CA; one that presents another certificate fails the
//!   handshake. Presenting none is allowed at the TLS layer only, so that a `Join` can come
//!   in: the server requires a verified certificate for every other request (per request,
//!   see `server`).
//! * A node's client presents its node certificate and trusts only the cluster CA, with
//!   the peer's address as the name checked.
//! * A joiner's client has no certificate yet and trusts the server only if the chain it
//!   presents holds a CA whose SHA-256 is the token's pin and the server's certificate is
//!   signed by it for the address dialled.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use crate::ca::CertKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    Config { what: &'static str, reason: String },
}

fn cfg(what: &'static str) -> impl FnOnce(String) -> TlsError {
    move |reason| TlsError::Config { what, reason }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cfg(what)(e.to_string()))?;
    if v.is_empty() {
        return Err(cfg(what)("no certificate in it".into()));
    }
    Ok(v)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| cfg("the node key")(e.to_string()))
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut r = RootCertStore::empty();
    for c in certs(ca_pem, "the cluster CA certificate")? {
        r.add(c).map_err(|e| cfg("the cluster CA certificate")(e.to_string()))?;
    }
    Ok(Arc::new(r))
}

/// The node's server: its certificate (with the CA behind it), clients verified against
/// the cluster CA when they present a certificate.
pub fn server_config(ca_pem: &str, node: &CertKey) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, p.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| cfg("the client verifier")(e.to_string()))?;
    let mut chain = certs(&node.cert_pem, "the node certificate")?;
    chain.extend(certs(ca_pem, "the cluster CA certificate")?);
    let c = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg("TLS versions")(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key(&node.key_pem)?)
        .map_err(|e| cfg("the node certificate")(e.to_string()))?;
    Ok(Arc::new(c))
}

/// A node's client: presents its certificate, trusts the cluster CA only.
pub fn client_config(ca_pem: &str, node: &CertKey) -> Result<Arc<ClientConfig>, TlsError> {
    let c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg("TLS versions")(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs(&node.cert_pem, "the node certificate")?, key(&node.key_pem)?)
        .map_err(|e| cfg("the node certificate")(e.to_string()))?;
    Ok(Arc::new(c))
}

/// A joiner's client: no certificate; the server is trusted through the CA pin.
pub fn join_client_config(pin: [u8; 32]) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let c = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg("TLS versions")(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin, provider: p }))
        .with_no_client_auth();
    Ok(Arc::new(c))
}

/// Any client config with these roots and no certificate of its own (tests: a process
/// that is not a node).
pub fn anonymous_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg("TLS versions")(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth();
    Ok(Arc::new(c))
}

/// Trusts a server whose chain holds the CA with this pin and whose certificate that CA
/// signed for the name dialled.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
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
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the node does not present the cluster CA the join token names (its pin differs): check the address and the token"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        v.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
