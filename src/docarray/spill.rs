//! Where the image bytes of a dataset being trained on or evaluated are kept: in memory up to a
//! budget, past it in an unnamed temporary file beside the dataset (else in `TMPDIR`), gone when
//! the last reference is.
//!
//! A docarray file carries its images inside it, and compression hides how large they are: a
//! few hundred kilobytes sent to the trainer can unpack to gigabytes of blobs, all within
//! `--max-dataset-bytes`. A run holds every pair for its whole length, so holding the blobs in
//! memory let such a dataset take the trainer down, and the run, resumed at restart, took it
//! down again. Past the budget a blob costs its bytes on disk and a read when its batch comes.
//!
//! The file goes in the dataset's own folder: for the trainer that is `<data-dir>`, the disk
//! sized for datasets (and watched by `--min-free-bytes`), where `TMPDIR` is often a tmpfs,
//! which would put the spilled bytes back in memory. A folder that takes no file (read-only
//! data) falls back to `TMPDIR`.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Image bytes a reader keeps in memory before it spills the rest to disk.
pub const MEMORY_BUDGET: u64 = 512 << 20;

/// Image bytes a dataset holds.
#[derive(Debug, Clone)]
pub enum Held {
    Memory(Vec<u8>),
    /// `len` bytes at `offset` of a spill file.
    Disk {
        file: Arc<File>,
        offset: u64,
        len: usize,
    },
}

impl Held {
    pub fn len(&self) -> usize {
        match self {
            Held::Memory(v) => v.len(),
            Held::Disk { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes it keeps in memory.
    pub fn in_memory(&self) -> usize {
        match self {
            Held::Memory(v) => v.len(),
            Held::Disk { .. } => 0,
        }
    }

    /// The bytes, read back from disk when they were spilled.
    pub fn bytes(&self) -> std::io::Result<Cow<'_, [u8]>> {
        match self {
            Held::Memory(v) => Ok(Cow::Borrowed(v)),
            Held::Disk { file, offset, len } => {
                let mut buf = vec![0u8; *len];
                file.read_exact_at(&mut buf, *offset)?;
                Ok(Cow::Owned(buf))
            }
        }
    }
}

/// Equal when the bytes are (a spilled copy equals the original).
impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && matches!((self.bytes(), other.bytes()), (Ok(a), Ok(b)) if a == b)
    }
}

/// Decides, image by image as a dataset is read, what stays in memory and what is spilled.
#[derive(Debug)]
pub struct Spill {
    budget: u64,
    in_memory: u64,
    /// Where the spill file is made, before `TMPDIR`.
    near: PathBuf,
    file: Option<Arc<File>>,
    end: u64,
}

impl Spill {
    /// A budget of `budget` bytes in memory; past it a file in `near` (the dataset's folder;
    /// an empty path is the working folder), else in `TMPDIR`.
    pub fn new(budget: u64, near: &Path) -> Self {
        let near = if near.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            near.to_path_buf()
        };
        Self {
            budget,
            in_memory: 0,
            near,
            file: None,
            end: 0,
        }
    }

    /// `held` as the dataset keeps it: in memory while the budget lasts, else appended to the
    /// spill file (made at the first spill).
    pub fn keep(&mut self, held: Held) -> std::io::Result<Held> {
        let Held::Memory(bytes) = held else {
            return Ok(held);
        };
        let len = bytes.len() as u64;
        if self.in_memory + len <= self.budget {
            self.in_memory += len;
            return Ok(Held::Memory(bytes));
        }
        let file = match &self.file {
            Some(f) => f.clone(),
            None => {
                let f = match tempfile::tempfile_in(&self.near) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::debug!(
                            "cannot spill into {}: {e}; spilling into TMPDIR",
                            self.near.display()
                        );
                        tempfile::tempfile()?
                    }
                };
                let f = Arc::new(f);
                self.file = Some(f.clone());
                f
            }
        };
        file.write_all_at(&bytes, self.end)?;
        let offset = self.end;
        self.end += len;
        Ok(Held::Disk {
            file,
            offset,
            len: bytes.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_budget_bytes_go_to_disk_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(10, dir.path());
        let kept: Vec<Held> = [
            vec![1u8; 6],
            vec![2u8; 4],
            vec![3u8; 5],
            vec![],
            vec![4u8; 7],
        ]
        .into_iter()
        .map(|b| spill.keep(Held::Memory(b)).unwrap())
        .collect();
        let where_: Vec<bool> = kept.iter().map(|h| matches!(h, Held::Memory(_))).collect();
        // 6 + 4 fill the budget; an empty blob still fits; the rest spill.
        assert_eq!(where_, [true, true, false, true, false]);
        assert_eq!(kept[2].bytes().unwrap().as_ref(), &[3u8; 5]);
        assert_eq!(kept[4].bytes().unwrap().as_ref(), &[4u8; 7]);
        assert_eq!(kept[4], Held::Memory(vec![4u8; 7]));
        assert_ne!(kept[4], Held::Memory(vec![4u8; 6]));
        assert_eq!(kept.iter().map(Held::in_memory).sum::<usize>(), 10);
        // The spill file is in the folder given, not in TMPDIR.
        assert!(spill_folder(&kept[2]).starts_with(dir.path()));
        // Clones share the file; it outlives the Spill that made it.
        let copy = kept[2].clone();
        drop(spill);
        drop(kept);
        assert_eq!(copy.bytes().unwrap().as_ref(), &[3u8; 5]);
    }

    /// Where a spilled blob's (unnamed) file lives, from the kernel's name for its descriptor.
    fn spill_folder(h: &Held) -> PathBuf {
        use std::os::fd::AsRawFd;
        let Held::Disk { file, .. } = h else {
            panic!("not spilled: {h:?}")
        };
        let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        link.parent().unwrap().to_path_buf()
    }

    #[test]
    fn a_folder_that_takes_no_file_spills_into_tmpdir() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("no-such-folder");
        let mut spill = Spill::new(0, &gone);
        let kept = spill.keep(Held::Memory(vec![5u8; 3])).unwrap();
        assert_eq!(kept.bytes().unwrap().as_ref(), &[5u8; 3]);
        assert!(spill_folder(&kept).starts_with(tempfile::env::temp_dir()));
    }
}
