//! An append-only log file that starts anew each day (UTC).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use chrono::{NaiveDate, Utc};

/// Lines go to `DIR/PREFIXyyyymmdd.EXT`; a new file gets `header` first.
pub(crate) struct DailyFile {
    dir: PathBuf,
    prefix: &'static str,
    extension: &'static str,
    header: fn() -> String,
    file: Mutex<Option<(NaiveDate, File)>>,
}

impl DailyFile {
    pub(crate) fn new(
        dir: PathBuf,
        prefix: &'static str,
        extension: &'static str,
        header: fn() -> String,
    ) -> Self {
        Self {
            dir,
            prefix,
            extension,
            header,
            file: Mutex::new(None),
        }
    }

    pub(crate) fn path_for(&self, day: NaiveDate) -> PathBuf {
        self.dir.join(format!(
            "{}{}.{}",
            self.prefix,
            day.format("%Y%m%d"),
            self.extension
        ))
    }

    /// Appends one whole line (with its line end) in one write.
    pub(crate) fn append(&self, line: &str) -> io::Result<()> {
        let today = Utc::now().date_naive();
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|(day, _)| *day != today) {
            fs::create_dir_all(&self.dir)?;
            let path = self.path_for(today);
            let new = !path.exists();
            let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
            if new {
                f.write_all((self.header)().as_bytes())?;
            }
            *guard = Some((today, f));
        }
        match guard.as_mut() {
            Some((_, f)) => f.write_all(line.as_bytes()),
            None => Ok(()),
        }
    }
}
