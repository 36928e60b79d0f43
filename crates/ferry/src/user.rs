//! `ferry user hash`: the argon2 hash of a device password for the config.

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

use anyhow::Context;
use argon2::password_hash::{rand_core::OsRng, SaltString};
use argon2::{Argon2, PasswordHasher};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum UserCommand {
    /// Read a password from standard input, print its argon2id hash.
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

pub fn hash(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
}
