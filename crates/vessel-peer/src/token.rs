//! Join tokens: single-use, expiring, and carrying the cluster CA's pin.
//!
//! The text a person copies is `vessel1.<id>.<secret>.<pin>`: `id` (8 hex) names the
//! token's record, `secret` (32 hex, 128 bits) proves the joiner got the token, `pin` (64
//! hex) is the SHA-256 of the cluster CA certificate, so that the joiner verifies the node
//! it talks to before it sends the secret (kubeadm's discovery-token-ca-cert-hash).
//!
//! The record `/vessel/v1/join-tokens/<id>` holds the secret's SHA-256, the expiry and
//! whether it was used; consuming it is one etcd transaction that compares the record's
//! `mod_revision` and sets `used`, so of two joiners racing with one token only one wins.
//! The decisions ([`check`]) are pure.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vessel_cluster::keys;
use vessel_cluster::store::Store;

const PREFIX: &str = "vessel1";

/// A token as the joiner holds it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
    pub pin: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("id", &self.id).finish_non_exhaustive()
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, hex::encode(self.pin))
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Token {
    /// A new token for the CA with this pin.
    pub fn generate(pin: [u8; 32]) -> Token {
        let mut id = [0u8; 4];
        let mut secret = [0u8; 16];
        random(&mut id);
        random(&mut secret);
        Token {
            id: hex::encode(id),
            secret: hex::encode(secret),
            pin,
        }
    }

    pub fn parse(text: &str) -> Result<Token, TokenError> {
        let bad = || TokenError::Malformed;
        let mut parts = text.trim().split('.');
        let (Some(p), Some(id), Some(secret), Some(pin), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if p != PREFIX || !is_hex(id, 8) || !is_hex(secret, 32) || !is_hex(pin, 64) {
            return Err(bad());
        }
        let mut pin_b = [0u8; 32];
        hex::decode_to_slice(pin, &mut pin_b).map_err(|_| bad())?;
        Ok(Token {
            id: id.to_string(),
            secret: secret.to_string(),
            pin: pin_b,
        })
    }

    /// What is sent to the serving node: the token without its pin.
    pub fn wire(&self) -> String {
        format!("{PREFIX}.{}.{}", self.id, self.secret)
    }

    /// Split what a joiner sent (`vessel1.<id>.<secret>`).
    pub fn parse_wire(text: &str) -> Result<(String, String), TokenError> {
        let mut parts = text.split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(PREFIX), Some(id), Some(secret), None) if is_hex(id, 8) && is_hex(secret, 32) => {
                Ok((id.to_string(), secret.to_string()))
            }
            _ => Err(TokenError::Malformed),
        }
    }
}

/// Fill `buf` from the kernel's random source.
pub fn random(buf: &mut [u8]) {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .expect("the kernel's random source works");
}

/// A token's record in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub expires_ns: i64,
    pub used: bool,
    /// Who used it (the joined node's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
}

impl TokenRecord {
    pub fn new(secret: &str, expires_ns: i64) -> TokenRecord {
        TokenRecord {
            secret_sha256: hex::encode(Sha256::digest(secret.as_bytes())),
            expires_ns,
            used: false,
            used_by: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the join token is malformed: it looks like vessel1.<id>.<secret>.<pin>, as `vessel cluster init` or `vessel cluster token` printed it")]
    Malformed,
    #[error("unknown join token: make one with `vessel cluster token` on a node of the cluster")]
    Unknown,
    #[error("wrong join token secret: copy the whole token `vessel cluster token` printed")]
    WrongSecret,
    #[error("the join token was already used{}: a token admits one node; make a new one with `vessel cluster token`", .0.as_deref().map(|n| format!(" (by {n})")).unwrap_or_default())]
    Used(Option<String>),
    #[error("the join token expired: make a new one with `vessel cluster token [--ttl 1h]`")]
    Expired,
    #[error("the join token's record could not be updated: {0}")]
    Store(String),
}

/// May this secret join with this record now? Pure. The order matters: nothing about a
/// token is told to someone without its secret.
pub fn check(rec: Option<&TokenRecord>, secret: &str, now_ns: i64) -> Result<(), TokenError> {
    let rec = rec.ok_or(TokenError::Unknown)?;
    let given = Sha256::digest(secret.as_bytes());
    let mut want = [0u8; 32];
    if hex::decode_to_slice(&rec.secret_sha256, &mut want).is_err() {
        return Err(TokenError::WrongSecret);
    }
    // Without an early exit: the time taken does not tell how much of it matched.
    if given.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
        return Err(TokenError::WrongSecret);
    }
    if rec.used {
        return Err(TokenError::Used(rec.used_by.clone()));
    }
    if now_ns >= rec.expires_ns {
        return Err(TokenError::Expired);
    }
    Ok(())
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Make a token valid for `ttl` and record it.
pub async fn create(store: &Store, pin: [u8; 32], ttl: std::time::Duration) -> Result<Token, TokenError> {
    let t = Token::generate(pin);
    let rec = TokenRecord::new(&t.secret, now_ns().saturating_add(ttl.as_nanos() as i64));
    store
        .put(&keys::join_token(&t.id), &rec)
        .await
        .map_err(|e| TokenError::Store(e.to_string()))?;
    Ok(t)
}

/// Check a token without using it up.
pub async fn verify(store: &Store, wire: &str) -> Result<(), TokenError> {
    let (id, secret) = Token::parse_wire(wire)?;
    let rec = store
        .get_rev::<TokenRecord>(&keys::join_token(&id))
        .await
        .map_err(|e| TokenError::Store(e.to_string()))?;
    check(rec.as_ref().map(|(r, _)| r), &secret, now_ns())
}

/// Use a token up for node `by`: checked, then marked used in one transaction that
/// fails if the record changed since it was read (then read and checked again).
pub async fn consume(store: &Store, wire: &str, by: &str) -> Result<(), TokenError> {
    let (id, secret) = Token::parse_wire(wire)?;
    let key = keys::join_token(&id);
    let st = |e: vessel_cluster::ClusterError| TokenError::Store(e.to_string());
    for _ in 0..8 {
        let rec = store.get_rev::<TokenRecord>(&key).await.map_err(st)?;
        check(rec.as_ref().map(|(r, _)| r), &secret, now_ns())?;
        let (mut rec, rev) = rec.expect("checked: the record exists");
        rec.used = true;
        rec.used_by = Some(by.to_string());
        if store.put_if(&key, &rec, rev).await.map_err(st)? {
            return Ok(());
        }
    }
    Err(TokenError::Store("the record kept changing while it was used".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_print_and_parse() {
        let t = Token::generate([7; 32]);
        let text = t.to_string();
        assert!(text.starts_with("vessel1."), "{text}");
        assert_eq!(text.len(), "vessel1".len() + 1 + 8 + 1 + 32 + 1 + 64);
        assert_eq!(Token::parse(&text).unwrap(), t);
        assert_eq!(Token::parse(&format!("  {text}\n")).unwrap(), t);
        assert_eq!(Token::parse_wire(&t.wire()).unwrap(), (t.id.clone(), t.secret.clone()));
        assert_ne!(Token::generate([7; 32]).secret, t.secret, "secrets are random");
        assert!(!format!("{t:?}").contains(&t.secret), "Debug hides the secret");
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = Token::generate([1; 32]).to_string();
        let cases = [
            String::new(),
            "vessel1".into(),
            good.replacen("vessel1", "vessel2", 1),
            format!("{good}.x"),
            good[..good.len() - 1].to_string(),
            good.to_uppercase(),
            good.replacen('.', "..", 1),
            "vessel1.abcdefgh.0123456789abcdef0123456789abcdef.00".into(),
        ];
        for c in &cases {
            assert_eq!(Token::parse(c), Err(TokenError::Malformed), "{c:?}");
        }
        assert_eq!(
            Token::parse_wire(&good),
            Err(TokenError::Malformed),
            "the pin is not sent"
        );
        assert_eq!(Token::parse_wire("vessel1.zz.yy"), Err(TokenError::Malformed));
    }

    #[test]
    fn record_decisions() {
        let secret = "0123456789abcdef0123456789abcdef";
        let rec = TokenRecord::new(secret, 1000);
        assert_eq!(check(Some(&rec), secret, 999), Ok(()));
        assert_eq!(check(None, secret, 0), Err(TokenError::Unknown));
        assert_eq!(
            check(Some(&rec), "0123456789abcdef0123456789abcdee", 0),
            Err(TokenError::WrongSecret)
        );
        assert_eq!(check(Some(&rec), secret, 1000), Err(TokenError::Expired));
        let used = TokenRecord {
            used: true,
            used_by: Some("b".into()),
            ..rec.clone()
        };
        assert_eq!(check(Some(&used), secret, 0), Err(TokenError::Used(Some("b".into()))));
        // A wrong secret learns nothing about use or expiry.
        assert_eq!(check(Some(&used), "x", 5000), Err(TokenError::WrongSecret));
        let damaged = TokenRecord {
            secret_sha256: "zz".into(),
            ..rec
        };
        assert_eq!(check(Some(&damaged), secret, 0), Err(TokenError::WrongSecret));
        assert!(TokenError::Used(Some("b".into()))
            .to_string()
            .contains("already used (by b)"));
    }
}
