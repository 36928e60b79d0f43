//! `ferry user hash`: the argon2 hash of a device password for the config.

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

use anyhow::Context;
use argon2::password_hash::{rand_core::OsRng, SaltString};
use argon2::{Argon2, PasswordHasher};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum UserCommand {
    /// Read a password from standard input, print its argon2id hash
    /// (m=19456 KiB, t=2, p=1: each AUTH verification holds 19 MiB for
    /// some 20-40 ms).
    Hash,
}

pub fn run(cmd: UserCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        UserCommand::Hash => {
            if std::io::stdin().is_terminal() {
                eprintln!("password (then Enter):");
            }
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password")?;
            let password = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "empty password");
            println!("{}", hash(password)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// argon2id's memory cost in KiB, passes and lanes: OWASP's first
/// recommendation (19 MiB, 2 passes, 1 lane), written out so that a new
/// version of the argon2 crate cannot change them unseen. A verification
/// holds the memory for its whole run (some 20-40 ms on a server core):
/// the worker's `[auth] max_verifications` times this is the memory AUTH
/// may take.
pub const PARAMS: (u32, u32, u32) = (19_456, 2, 1);

/// The argon2id hash of `password` with [`PARAMS`] and a random salt, as
/// a PHC string.
///
/// # Errors
/// The hashing failed (it does not with these parameters).
pub fn hash(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    let (m, t, p) = PARAMS;
    let params = argon2::Params::new(m, t, p, None)
        .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
}
