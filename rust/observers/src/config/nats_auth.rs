//! NATS authentication files: `credentials_file` (a `.creds` file: user JWT + nkey seed) and
//! `nkey_file` (a user nkey seed, `SU…`). Read when the config is loaded, so that a missing or
//! malformed file is a config error naming the file and the key, and again at connect.
//!
//! Messages name the path, never the seed.

use std::fmt;

use nkeys::error::ErrorKind;
use nkeys::{KeyPair, KeyPairType};

/// A user nkey seed read from `nkey_file`. `Debug` shows only the public key.
#[derive(Clone)]
pub struct NkeySeed {
    seed: String,
    public_key: String,
}

impl NkeySeed {
    /// The seed, for `ConnectOptions::nkey`.
    pub fn seed(&self) -> &str {
        &self.seed
    }

    /// The user's public nkey (`U…`), the one the server's `authorization` block lists.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }
}

impl fmt::Debug for NkeySeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NkeySeed")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

fn quote_path(path: &str) -> String {
    format!("{path:?}")
}

fn read_text(path: &str) -> Result<String, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", quote_path(path)))?;
    String::from_utf8(bytes).map_err(|_| format!("{} is not a text file", quote_path(path)))
}

/// Reads the user nkey seed from `path`: the first line (blank space trimmed) that starts with
/// `S`, so both a bare seed (`nk -gen user`) and a file with decoration lines are accepted.
pub fn read_nkey_seed(path: &str) -> Result<NkeySeed, String> {
    let text = read_text(path)?;
    let shown = quote_path(path);
    let Some(line) = text.lines().map(str::trim).find(|l| l.starts_with('S')) else {
        return Err(format!(
            "{shown} holds no nkey seed (expected a line starting with \"SU\", such as \
             `nk -gen user` writes)"
        ));
    };
    let pair = KeyPair::from_seed(line).map_err(|e| {
        let why = match e.kind() {
            ErrorKind::InvalidKeyLength => {
                format!(
                    "it is {} characters long, a seed has 58",
                    line.chars().count()
                )
            }
            ErrorKind::ChecksumFailure => "its checksum does not match".to_string(),
            ErrorKind::InvalidPrefix => "it does not have a seed's prefix".to_string(),
            _ => "it is not base32-encoded".to_string(),
        };
        format!("{shown} does not hold a valid nkey seed: {why}")
    })?;
    if pair.key_pair_type() != KeyPairType::User {
        let kind = match pair.key_pair_type() {
            KeyPairType::Operator => "an operator",
            KeyPairType::Account => "an account",
            KeyPairType::Server => "a server",
            KeyPairType::Cluster => "a cluster",
            _ => "a non-user",
        };
        return Err(format!(
            "{shown} holds {kind} nkey seed; a client authenticates with a user seed (\"SU…\")"
        ));
    }
    Ok(NkeySeed {
        seed: line.to_string(),
        public_key: pair.public_key(),
    })
}

/// Checks that `path` is a credentials file async-nats can use (a user JWT block and an nkey
/// seed block), with the same parser the connection uses.
pub fn check_credentials_file(path: &str) -> Result<(), String> {
    let text = read_text(path)?;
    async_nats::ConnectOptions::new()
        .credentials(&text)
        .map(drop)
        .map_err(|e| {
            format!(
                "{} is not a NATS credentials file ({e}); expected the user JWT and nkey seed \
                 blocks that `nsc generate creds` writes",
                quote_path(path)
            )
        })
}
