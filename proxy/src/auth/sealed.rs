//! Sealed session tokens: a proxy token that carries its own session, encrypted and
//! authenticated with a key every replica holds (`--session-key-file`), so that any replica, and
//! the same process after a restart, can act as the client's etcd user without a new login.
//!
//! A token is `ecp.` and the URL-safe base64 (no padding) of:
//! `version (1) | key id (4) | nonce (12) | AES-256-GCM(issued-at (8) | user length (2) | user | password) | tag (16)`.
//! The key id and version are authenticated too (additional data). The AEAD key and the key id
//! are derived from the key file's line with HKDF-SHA256, so a line may be longer than 32 bytes.
//! A token stays valid while a key that opens it is in the file and etcd accepts the password
//! inside: removing the key revokes every token it sealed, changing the user's password revokes
//! that user's.

use std::sync::RwLock;

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroize;

use super::{Credentials, Secret};

/// Prefix of every token this proxy issues.
pub(super) const TOKEN_PREFIX: &str = "ecp.";
/// Shortest key accepted, in bytes (before base64): 256 bits.
pub const MIN_KEY_BYTES: usize = 32;
const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// Longest token opened; real ones are a few hundred bytes (etcd caps user names and passwords).
const MAX_TOKEN_LEN: usize = 4096;
const HKDF_SALT: &[u8] = b"etcd-compat-proxy session token v1";

/// The keys that seal and open tokens; the first seals.
pub struct SessionKeys {
    keys: RwLock<Vec<SessionKey>>,
    random: SystemRandom,
}

struct SessionKey {
    id: [u8; KEY_ID_LEN],
    aead: LessSafeKey,
}

/// Why a session key file was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyFileError {
    /// 1-based line of the file, 0 for the file as a whole.
    pub line: usize,
    /// What is wrong, in words that say what to do.
    pub reason: String,
}

impl std::fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => f.write_str(&self.reason),
            line => write!(f, "line {line}: {}", self.reason),
        }
    }
}

/// The keys of a session key file: one base64 key of at least 32 bytes per line; empty lines
/// and `#` comments are skipped.
pub fn parse_key_file(text: &str) -> Result<Vec<Secret>, KeyFileError> {
    let mut keys = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let refuse = |reason: String| KeyFileError { line: index + 1, reason };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(line)
            .map_err(|_| refuse("not base64; make a key with `head -c 32 /dev/urandom | base64`".to_owned()))?;
        if bytes.len() < MIN_KEY_BYTES {
            return Err(refuse(format!(
                "{} bytes, shorter than {MIN_KEY_BYTES}; make a key with `head -c 32 /dev/urandom | base64`",
                bytes.len()
            )));
        }
        keys.push(Secret::new(bytes));
    }
    if keys.is_empty() {
        return Err(KeyFileError {
            line: 0,
            reason: "no key in the file; add one made with `head -c 32 /dev/urandom | base64`".to_owned(),
        });
    }
    Ok(keys)
}

/// A length for HKDF's output.
struct Length(usize);

impl hkdf::KeyType for Length {
    fn len(&self) -> usize {
        self.0
    }
}

impl SessionKey {
    fn derive(secret: &Secret) -> Option<SessionKey> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret.expose());
        let mut id = [0u8; KEY_ID_LEN];
        prk.expand(&[b"key id"], Length(KEY_ID_LEN)).ok()?.fill(&mut id).ok()?;
        let aead = UnboundKey::from(prk.expand(&[b"aes-256-gcm"], &AES_256_GCM).ok()?);
        Some(SessionKey { id, aead: LessSafeKey::new(aead) })
    }
}

impl SessionKeys {
    /// Keys from a session key file's lines; `None` if the crypto provider refused them.
    pub fn new(secrets: &[Secret]) -> Option<SessionKeys> {
        let keys = secrets.iter().map(SessionKey::derive).collect::<Option<Vec<_>>>()?;
        Some(SessionKeys { keys: RwLock::new(keys), random: SystemRandom::new() })
    }

    /// One random key, for a proxy without `--session-key-file`: its tokens die with the process.
    pub fn random() -> Option<SessionKeys> {
        let mut bytes = vec![0u8; MIN_KEY_BYTES];
        SystemRandom::new().fill(&mut bytes).ok()?;
        SessionKeys::new(&[Secret::new(bytes)])
    }

    /// Replaces the keys (a reloaded file); tokens sealed with a key no longer present stop opening.
    pub fn replace(&self, secrets: &[Secret]) -> bool {
        let Some(keys) = secrets.iter().map(SessionKey::derive).collect::<Option<Vec<_>>>() else { return false };
        match self.keys.write() {
            Ok(mut slot) => *slot = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
        true
    }

    /// A token carrying `credentials`, sealed with the first key; `None` if the crypto provider failed.
    pub fn seal(&self, credentials: &Credentials, issued_unix: u64) -> Option<String> {
        let user = credentials.user.as_bytes();
        let user_len = u16::try_from(user.len()).ok()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let keys = self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = keys.first()?;
        let mut sealed =
            Vec::with_capacity(HEADER_LEN + 10 + user.len() + credentials.password.expose().len() + TAG_LEN);
        sealed.push(VERSION);
        sealed.extend_from_slice(&key.id);
        sealed.extend_from_slice(&nonce);
        let mut plaintext = Vec::with_capacity(10 + user.len() + credentials.password.expose().len() + TAG_LEN);
        plaintext.extend_from_slice(&issued_unix.to_be_bytes());
        plaintext.extend_from_slice(&user_len.to_be_bytes());
        plaintext.extend_from_slice(user);
        plaintext.extend_from_slice(credentials.password.expose());
        let sealing = key.aead.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&sealed[..1 + KEY_ID_LEN]),
            &mut plaintext,
        );
        if sealing.is_err() {
            plaintext.zeroize();
            return None;
        }
        sealed.extend_from_slice(&plaintext);
        let mut token = String::from(TOKEN_PREFIX);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&sealed, &mut token);
        Some(token)
    }

    /// The credentials inside `token`, if one of the keys sealed it and it is whole; `None` for
    /// anything else (another proxy's key, a forged or cut token, an etcd token).
    pub fn open(&self, token: &str) -> Option<Credentials> {
        let encoded = token.strip_prefix(TOKEN_PREFIX)?;
        if encoded.len() > MAX_TOKEN_LEN {
            return None;
        }
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded).ok()?;
        if sealed.len() < HEADER_LEN + 10 + TAG_LEN || sealed[0] != VERSION {
            return None;
        }
        let (header, ciphertext) = sealed.split_at(HEADER_LEN);
        let id = &header[1..1 + KEY_ID_LEN];
        let nonce = Nonce::try_assume_unique_for_key(&header[1 + KEY_ID_LEN..]).ok()?;
        let keys = self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = keys.iter().find(|key| key.id == id)?;
        let mut opened = ciphertext.to_vec();
        let plaintext = match key.aead.open_in_place(nonce, Aad::from(&header[..1 + KEY_ID_LEN]), &mut opened) {
            Ok(plaintext) => plaintext,
            Err(_) => {
                opened.zeroize();
                return None;
            }
        };
        let credentials = read_plaintext(plaintext);
        opened.zeroize();
        credentials
    }
}

fn read_plaintext(plaintext: &[u8]) -> Option<Credentials> {
    let user_len = usize::from(u16::from_be_bytes(plaintext.get(8..10)?.try_into().ok()?));
    let user = std::str::from_utf8(plaintext.get(10..10 + user_len)?).ok()?.to_owned();
    let password = Secret::new(plaintext.get(10 + user_len..)?.to_vec());
    Some(Credentials { user, password })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fill: u8) -> Secret {
        Secret::new(vec![fill; 32])
    }

    fn alice() -> Credentials {
        Credentials { user: "alice".to_owned(), password: Secret::new(b"s3cret".to_vec()) }
    }

    #[test]
    fn a_token_opens_with_its_key_and_holds_the_session() {
        let keys = SessionKeys::new(&[key(1)]).unwrap();
        let token = keys.seal(&alice(), 1_800_000_000).unwrap();
        assert!(token.starts_with("ecp."), "{token}");
        assert!(!token.contains("alice") && !token.contains("s3cret"), "{token}");
        let opened = keys.open(&token).unwrap();
        assert_eq!((opened.user.as_str(), opened.password.expose()), ("alice", &b"s3cret"[..]));
        // Another replica with the same key file opens it too.
        let replica = SessionKeys::new(&[key(1)]).unwrap();
        assert_eq!(replica.open(&token).unwrap().user, "alice");
        // Two tokens for the same session differ (fresh nonce).
        assert_ne!(keys.seal(&alice(), 1_800_000_000).unwrap(), token);
    }

    #[test]
    fn foreign_forged_and_cut_tokens_do_not_open() {
        let keys = SessionKeys::new(&[key(1)]).unwrap();
        let token = keys.seal(&alice(), 1).unwrap();
        let foreign = SessionKeys::new(&[key(2)]).unwrap();
        assert!(foreign.open(&token).is_none());
        assert!(keys.open(&token[..token.len() - 1]).is_none());
        assert!(keys.open(&token[..20]).is_none());
        assert!(keys.open("ecp.").is_none());
        assert!(keys.open("etcd-simple-token.42").is_none());
        assert!(keys.open(&format!("ecp.{}", "A".repeat(5000))).is_none());
        // Every single flipped character of the sealed part is caught.
        let body: Vec<char> = token.chars().collect();
        for at in 4..body.len() {
            let mut forged = body.clone();
            forged[at] = if forged[at] == 'A' { 'B' } else { 'A' };
            let forged: String = forged.into_iter().collect();
            assert!(keys.open(&forged).is_none(), "flipped at {at}");
        }
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_all_until_removed() {
        let keys = SessionKeys::new(&[key(1)]).unwrap();
        let old = keys.seal(&alice(), 1).unwrap();
        assert!(keys.replace(&[key(2), key(1)]));
        let new = keys.seal(&alice(), 2).unwrap();
        assert!(keys.open(&old).is_some() && keys.open(&new).is_some());
        assert!(SessionKeys::new(&[key(1)]).unwrap().open(&new).is_none(), "sealed with the new key");
        assert!(keys.replace(&[key(2)]));
        assert!(keys.open(&old).is_none(), "rotated out");
        assert!(keys.open(&new).is_some());
    }

    #[test]
    fn key_files_are_checked_line_by_line() {
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(parse_key_file(&format!("# rotated 2026-12\n{good}\n\n{good}\n")).unwrap().len(), 2);
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        assert_eq!(
            parse_key_file(&format!("{good}\n{short}\n")).unwrap_err(),
            KeyFileError {
                line: 2,
                reason: "16 bytes, shorter than 32; make a key with `head -c 32 /dev/urandom | base64`".to_owned()
            }
        );
        assert_eq!(parse_key_file("not base64!\n").unwrap_err().line, 1);
        assert_eq!(parse_key_file("# only a comment\n").unwrap_err().line, 0);
    }
}
