//! Reading the file into the `raw` types one key at a time.
//!
//! serde's derived `Deserialize` stops at the first unknown key or wrong
//! type, so a file with six mistakes would show one. Here the file is first
//! parsed into spanned TOML values, then each key is taken from its table
//! and converted on its own: a bad key is recorded and reading goes on, and
//! whatever keys nobody took are reported as unknown. A required key that
//! is missing or unreadable gets a placeholder with an empty span, so
//! validation still checks the rest of its table; `validate` drops errors
//! about placeholders, since their real error is already recorded.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// The errors found while reading: byte range in the file and message.
#[derive(Default)]
pub(crate) struct Reader {
    pub(crate) errors: Vec<(Range<usize>, String)>,
}

impl Reader {
    fn error(&mut self, at: Range<usize>, message: String) {
        self.errors.push((at, message));
    }

    /// Parses the whole document. Syntax errors end reading here: the
    /// partial tables a broken file leaves would only add noise.
    pub(crate) fn document<'i>(&mut self, text: &'i str) -> Option<Table<'i>> {
        let (doc, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            // Recovery after an error on a line often trips over the rest
            // of that line: its first error is the one that helps.
            let mut lines = Vec::new();
            for e in syntax {
                let at = e.span().unwrap_or(0..0);
                let line = text.get(..at.start).map_or(0, |s| s.matches('\n').count());
                if !lines.contains(&line) {
                    lines.push(line);
                    self.error(at, e.message().trim().to_string());
                }
            }
            return None;
        }
        let span = doc.span();
        Some(Table {
            name: "the top level".into(),
            span,
            entries: doc.into_inner(),
            known: Vec::new(),
        })
    }
}

/// A value for a required key that is missing or unreadable.
pub(crate) trait Placeholder {
    /// A value at the empty span `at..at`.
    fn placeholder(at: usize) -> Self;
}

impl<T: Default> Placeholder for Spanned<T> {
    fn placeholder(at: usize) -> Self {
        Spanned::new(at..at, T::default())
    }
}

impl Placeholder for String {
    fn placeholder(_: usize) -> Self {
        String::new()
    }
}

/// One TOML table whose keys are being taken.
pub(crate) struct Table<'i> {
    /// How messages name it: `[balancer]`, `[[connectors]]`.
    name: String,
    span: Range<usize>,
    entries: DeTable<'i>,
    /// The keys asked for, in order, for the unknown-key message.
    known: Vec<&'static str>,
}

impl<'i> Table<'i> {
    /// An optional key; a value of the wrong type is an error and `None`.
    pub(crate) fn opt<T: DeserializeOwned>(
        &mut self,
        r: &mut Reader,
        key: &'static str,
    ) -> Option<T> {
        self.known.push(key);
        let value = self.entries.remove(key)?;
        let span = value.span();
        match T::deserialize(ValueDeserializer::from(value)) {
            Ok(v) => Some(v),
            Err(e) => {
                let message = format!("{key}: {}", e.message().trim());
                r.error(e.span().unwrap_or(span), message);
                None
            }
        }
    }

    /// A key Ferry no longer reads: there, it is an error that says why
    /// and what to do instead of the unknown-key one.
    pub(crate) fn removed(&mut self, r: &mut Reader, key: &'static str, why: &str) {
        if let Some(value) = self.entries.remove(key) {
            r.error(
                value.span(),
                format!(
                    "`{key}` in {} is no longer a setting: {why}; remove it",
                    self.name
                ),
            );
        }
    }

    /// An optional key that defaults to empty.
    pub(crate) fn or_default<T: DeserializeOwned + Default>(
        &mut self,
        r: &mut Reader,
        key: &'static str,
    ) -> T {
        self.opt(r, key).unwrap_or_default()
    }

    /// A required key: missing or unreadable is an error and a placeholder.
    pub(crate) fn req<T: DeserializeOwned + Placeholder>(
        &mut self,
        r: &mut Reader,
        key: &'static str,
    ) -> T {
        if !self.entries.contains_key(key) {
            r.error(
                self.span.clone(),
                format!("{} needs the key `{key}`", self.name),
            );
        }
        self.opt(r, key)
            .unwrap_or_else(|| T::placeholder(self.span.end))
    }

    /// An optional sub-table, read by `read`.
    pub(crate) fn table<T>(
        &mut self,
        r: &mut Reader,
        key: &'static str,
        read: impl FnOnce(&mut Reader, &mut Table<'i>) -> T,
    ) -> Option<Spanned<T>> {
        self.known.push(key);
        let value = self.entries.remove(key)?;
        let name = format!("[{}{key}]", self.prefix());
        sub_table(r, name, value, read)
    }

    /// An optional array of tables (`[[key]]` or `key = [{ … }]`), each
    /// read by `read`.
    pub(crate) fn tables<T>(
        &mut self,
        r: &mut Reader,
        key: &'static str,
        mut read: impl FnMut(&mut Reader, &mut Table<'i>) -> T,
    ) -> Vec<Spanned<T>> {
        self.known.push(key);
        let Some(value) = self.entries.remove(key) else {
            return Vec::new();
        };
        let span = value.span();
        let DeValue::Array(items) = value.into_inner() else {
            r.error(span, format!("{key}: expected an array of tables"));
            return Vec::new();
        };
        let name = format!("[[{}{key}]]", self.prefix());
        items
            .into_iter()
            .filter_map(|item| sub_table(r, name.clone(), item, &mut read))
            .collect()
    }

    /// Reports every key no reader took.
    pub(crate) fn finish(self, r: &mut Reader) {
        let known = self
            .known
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        for key in self.entries.keys() {
            r.error(
                key.span(),
                format!(
                    "unknown key `{}` in {}; expected one of {known}",
                    key.get_ref(),
                    self.name
                ),
            );
        }
    }

    /// `balancer.` inside `[balancer]`, nothing at the top level.
    fn prefix(&self) -> String {
        let inner = self.name.trim_matches(['[', ']']);
        if inner.starts_with("the top") {
            String::new()
        } else {
            format!("{inner}.")
        }
    }
}

fn sub_table<'i, T>(
    r: &mut Reader,
    name: String,
    value: Spanned<DeValue<'i>>,
    read: impl FnOnce(&mut Reader, &mut Table<'i>) -> T,
) -> Option<Spanned<T>> {
    let span = value.span();
    let DeValue::Table(entries) = value.into_inner() else {
        r.error(span, format!("{name}: expected a table"));
        return None;
    };
    let mut table = Table {
        name,
        span: span.clone(),
        entries,
        known: Vec::new(),
    };
    let out = read(r, &mut table);
    table.finish(r);
    Some(Spanned::new(span, out))
}
