//! Config errors, each with its place in the file.

use std::fmt;
use std::path::PathBuf;

/// One error at a place in the file (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Every problem found in the file.
    #[error("{}", render(.file, .errors))]
    Invalid { file: String, errors: Vec<Located> },
}

impl ConfigError {
    /// The located errors (empty for a read failure).
    pub fn errors(&self) -> &[Located] {
        match self {
            ConfigError::Invalid { errors, .. } => errors,
            ConfigError::Read { .. } => &[],
        }
    }
}

fn render(file: &str, errors: &[Located]) -> String {
    let mut out = format!(
        "{} error{} in {file}",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for e in errors {
        out.push_str(&format!(
            "\n  {file}:{}:{}: {}",
            e.line, e.column, e.message
        ));
    }
    out
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Turns byte offsets into line and column.
pub(crate) struct LineIndex<'a> {
    text: &'a str,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Self { text }
    }

    pub(crate) fn locate(&self, offset: usize, message: impl Into<String>) -> Located {
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before.chars().count(), |nl| {
            before.get(nl + 1..).map_or(0, |s| s.chars().count())
        }) + 1;
        Located {
            line,
            column,
            message: message.into(),
        }
    }
}
