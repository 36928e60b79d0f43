//! The spool's file operations, behind an interface small enough to
//! simulate: one directory of files that are appended to, read at an
//! offset, cut back, flushed (`fdatasync`), deleted and listed, and the
//! directory itself flushed (`fsync`). [`Dir`] is the real one, a thin
//! layer over `std::fs`; the tests put a simulated disk in its place
//! (`sim`), which loses what a crash would lose, so that every flush the
//! journal relies on is shown to be needed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One directory of files, named without a path.
pub(crate) trait Storage: Send + Sync + 'static {
    /// The names of the files in the directory, in no order.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens a file to read; `NotFound` if there is none.
    fn open(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Opens a file to append to, created empty if there is none. A new
    /// file's directory entry is durable only after [`Storage::sync_dir`].
    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Deletes a file; durable only after [`Storage::sync_dir`].
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes the directory's entries durable (files created and deleted).
    fn sync_dir(&self) -> io::Result<()>;
}

/// An open file of a [`Storage`].
pub(crate) trait StorageFile: Send + Sync {
    /// The file's size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Reads up to `buf.len()` bytes at `offset`; 0 at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `bytes` at the end of the file.
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Cuts the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Makes what was written durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
}

impl dyn StorageFile + '_ {
    /// Fills `buf` from `offset`; `UnexpectedEof` if the file ends first.
    pub fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = buf.get_mut(n..).unwrap_or_default();
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads a [`StorageFile`] from its start, for a `BufReader`.
pub(crate) struct Reader {
    file: Box<dyn StorageFile>,
    at: u64,
}

impl Reader {
    pub fn new(file: Box<dyn StorageFile>) -> Self {
        Self { file, at: 0 }
    }
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// The real directory.
pub(crate) struct Dir {
    path: PathBuf,
}

impl Dir {
    /// The directory at `path`, created if missing. Each directory made
    /// here has its entry fsynced in its parent, so that a crash cannot
    /// take the spool away with the segments it held.
    pub fn create(path: &Path) -> io::Result<Self> {
        let made: Vec<&Path> = path
            .ancestors()
            .filter(|p| !p.as_os_str().is_empty())
            .take_while(|p| !p.exists())
            .collect();
        fs::create_dir_all(path)?;
        for dir in made {
            // A relative path's first component lives in the working directory.
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(parent)?.sync_all()?;
        }
        Ok(Self::at(path))
    }

    /// The directory at `path`, as it is (reads only, for inspection).
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }
}

impl Storage for Dir {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(fs::read_dir(&self.path)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(File::open(self.path.join(name))?))
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path.join(name))?;
        Ok(Box::new(file))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.path.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }
}

impl StorageFile for File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}
