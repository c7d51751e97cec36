//! SCRAM-SHA-256 (RFC 5802, RFC 7677) for clients, as PostgreSQL runs it, from a user's *verifier*: the salt,
//! the iteration count, StoredKey and ServerKey — what PostgreSQL stores in `pg_authid`
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`). `router-user-<name>` holds either that
//! verifier or a clear password (from which a verifier is made once, with a random salt). The router never
//! needs the password itself: it checks that the client's proof hashes to StoredKey, and signs with ServerKey.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// What the router keeps of a user to authenticate it with SCRAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one block (the salted password).
fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password.as_bytes(), &block);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password.as_bytes(), &u);
        out.iter_mut().zip(u).for_each(|(o, x)| *o ^= x);
    }
    out
}

impl Verifier {
    /// The verifier of a clear password (PostgreSQL does not normalize with SASLprep those it cannot; ASCII
    /// passwords, the usual case, are the same either way).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Reads `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts); `None` if `text` is
    /// not one (it is then a clear password).
    pub fn parse(text: &str) -> Option<Verifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (head, keys) = rest.split_once('$')?;
        let (iterations, salt) = head.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok().filter(|i| *i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

/// Where an exchange stands after the client's first message.
pub struct Exchange {
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// What the client's `c=` must be (base64-decoded): its GS2 header, plus the channel binding data when it
    /// bound the channel.
    binding: Vec<u8>,
}

/// Why an exchange failed: the client's message is malformed (08P01) or its proof is wrong (28P01).
#[derive(Debug, PartialEq, Eq)]
pub enum ScramError {
    Malformed(&'static str),
    BadProof,
}

/// The client's first message (`n,,n=<user>,r=<nonce>`, or `p=tls-server-end-point,,...` binding the TLS
/// channel): the server's first message to send, and the state. `endpoint`: over TLS, the hash of the
/// router's certificate (RFC 5929 `tls-server-end-point`), when SCRAM-SHA-256-PLUS was offered; then a
/// client saying `y` (it could have bound, and believes the server cannot) is refused as a downgrade.
pub fn server_first(
    v: &Verifier,
    client_first: &[u8],
    endpoint: Option<&[u8; 32]>,
) -> Result<(Vec<u8>, Exchange), ScramError> {
    let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let mut parts = text.splitn(3, ',');
    let flag = parts.next().ok_or(ScramError::Malformed("no GS2 header"))?;
    let authzid = parts.next().ok_or(ScramError::Malformed("no GS2 header"))?;
    let bare = parts.next().ok_or(ScramError::Malformed("no client-first-message-bare"))?;
    let gs2_header = format!("{flag},{authzid},");
    let binding = match (flag, endpoint) {
        ("n", _) | ("y", None) => gs2_header.clone().into_bytes(),
        ("y", Some(_)) => {
            return Err(ScramError::Malformed("channel binding was offered and the client did not use it"))
        }
        ("p=tls-server-end-point", Some(hash)) => [gs2_header.as_bytes(), hash].concat(),
        _ => return Err(ScramError::Malformed("unsupported channel binding")),
    };
    let client_nonce = bare
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .filter(|n| !n.is_empty())
        .ok_or(ScramError::Malformed("no client nonce"))?;
    let server_nonce: [u8; 18] = rand::random();
    let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
    let server_first = format!("r={nonce},s={},i={}", B64.encode(&v.salt), v.iterations);
    let exchange = Exchange { client_first_bare: bare.to_string(), server_first: server_first.clone(), nonce, binding };
    Ok((server_first.into_bytes(), exchange))
}

impl Exchange {
    /// The client's final message (`c=<binding>,r=<nonce>,p=<proof>`): the server's final message when the
    /// proof is right.
    pub fn server_final(self, v: &Verifier, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut binding = None;
        let mut nonce = None;
        for a in without_proof.split(',') {
            if let Some(b) = a.strip_prefix("c=") {
                binding = Some(b);
            } else if let Some(n) = a.strip_prefix("r=") {
                nonce = Some(n);
            }
        }
        if binding.and_then(|b| B64.decode(b).ok()).as_deref() != Some(self.binding.as_slice()) {
            return Err(ScramError::Malformed("channel binding does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] =
            B64.decode(proof).ok().and_then(|p| p.try_into().ok()).ok_or(ScramError::Malformed("malformed proof"))?;
        let auth_message = format!("{},{},{without_proof}", self.client_first_bare, self.server_first);
        let signature = hmac(&v.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        client_key.iter_mut().zip(signature).for_each(|(k, s)| *k ^= s);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        // (Compared in constant time: the comparison's duration says nothing of the key.)
        if stored.iter().zip(v.stored_key).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&v.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 7677 example, end to end: user "user", password "pencil".
    #[test]
    fn rfc_7677_exchange() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = Verifier::from_password("pencil", &salt, 4096);
        let text = format!(
            "SCRAM-SHA-256$4096:{}${}:{}",
            B64.encode(&v.salt),
            B64.encode(v.stored_key),
            B64.encode(v.server_key)
        );
        assert_eq!(Verifier::parse(&text), Some(v.clone()));
        // The RFC's messages, with the server nonce replaced by ours.
        let (first, ex) = server_first(&v, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO", None).unwrap();
        let first = String::from_utf8(first).unwrap();
        assert!(first.starts_with("r=rOprNGfwEbeRWgbNEkqO") && first.ends_with(",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"));
        // A client computes its proof from the password.
        let nonce = first.split(',').next().unwrap().trim_start_matches("r=").to_string();
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("n=user,r=rOprNGfwEbeRWgbNEkqO,{first},{without_proof}");
        let salted = salted_password("pencil", &salt, 4096);
        let client_key = hmac(&salted, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let sig = hmac(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        let last = format!("{without_proof},p={}", B64.encode(&proof));
        let server_final = ex.server_final(&v, last.as_bytes()).unwrap();
        let expect = hmac(&hmac(&salted, b"Server Key"), auth.as_bytes());
        assert_eq!(String::from_utf8(server_final).unwrap(), format!("v={}", B64.encode(expect)));
        // A wrong proof is refused.
        let (_, ex) = server_first(&v, b"n,,n=user,r=abc", None).unwrap();
        assert_eq!(
            ex.server_final(&v, b"c=biws,r=abc,p=AAAA").unwrap_err(),
            ScramError::Malformed("nonce does not match")
        );
        // Channel binding: offered over TLS, a `y` client is a downgrade; `p=` must carry the certificate hash.
        let hash = [7u8; 32];
        assert!(server_first(&v, b"y,,n=user,r=abc", Some(&hash)).is_err());
        assert!(server_first(&v, b"p=tls-server-end-point,,n=user,r=abc", None).is_err());
        let (first, ex) = server_first(&v, b"p=tls-server-end-point,,n=user,r=abc", Some(&hash)).unwrap();
        let nonce = String::from_utf8(first).unwrap().split(',').next().unwrap().trim_start_matches("r=").to_string();
        let wrong = format!("c={},r={nonce},p=AAAA", B64.encode(b"p=tls-server-end-point,,"));
        assert_eq!(
            ex.server_final(&v, wrong.as_bytes()).unwrap_err(),
            ScramError::Malformed("channel binding does not match")
        );
        // RFC 7677's own salted password check: the known StoredKey of "pencil".
        assert_eq!(B64.encode(v.stored_key), "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=");
    }
}
