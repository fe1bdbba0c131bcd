//! Finetuner-style CSV datasets, read as a stream.
//!
//! Training rows are two columns, a caption and an image path or URI in either order (the column
//! that looks like an image is the image), with an optional third column as label. Labelled
//! query/index rows are `item,label` (or `caption,image,label`, from which the wanted modality is
//! taken). No header; empty lines are skipped; a UTF-8 BOM is ignored; the delimiter is sniffed
//! from the first line (comma, tab, semicolon or pipe) as Python's csv.Sniffer would; relative
//! paths resolve against the CSV's folder.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::{
    image_source, looks_like_image, quoted, DataError, ImageRef, Item, Labeled, Modality, Pair,
};

/// The most bytes a row may run to, and the most newlines read ahead of the last row (blank
/// lines, or newlines inside a quoted cell). The csv crate grows its buffer to hold a row of
/// any length, and the line index keeps every newline not yet passed: a zipped `data.csv` of
/// one 3 GiB cell took the trainer down. A cell holding a whole image as a `data:` URI fits.
pub const MAX_ROW_BYTES: u64 = 64 << 20;
const MAX_PENDING_LINES: usize = 1 << 20;

/// A CSV opened for streaming.
pub struct CsvRows {
    path: PathBuf,
    base: PathBuf,
    records: csv::StringRecordsIntoIter<Box<dyn Read>>,
    lines: Rc<RefCell<LineIndex>>,
}

/// Byte offsets of the newlines read so far, consumed in order, to turn a record's byte position
/// into a line number (the csv crate does not count blank lines).
#[derive(Default)]
struct LineIndex {
    /// (offset of a newline, whether a carriage return precedes it)
    pending: VecDeque<(u64, bool)>,
    before: u64,
    offset: u64,
    last_was_cr: bool,
    /// Where the last row returned starts.
    row_start: u64,
}

impl LineIndex {
    /// 1-based line where the record at byte `pos` starts; positions must not decrease between
    /// calls. The csv crate places a record after the previous one's terminator, so blank lines
    /// in between are stepped over here.
    fn line_of(&mut self, mut pos: u64) -> u64 {
        while self.pending.front().is_some_and(|&(nl, _)| nl < pos) {
            self.pending.pop_front();
            self.before += 1;
        }
        while let Some(&(nl, cr)) = self.pending.front() {
            if nl == pos || (cr && nl == pos + 1) {
                self.pending.pop_front();
                self.before += 1;
                pos = nl + 1;
            } else {
                break;
            }
        }
        self.before + 1
    }
}

/// Passes bytes through, noting where the newlines are.
struct CountLines<R> {
    inner: R,
    lines: Rc<RefCell<LineIndex>>,
}

impl<R: Read> Read for CountLines<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut idx = self.lines.borrow_mut();
        let start = idx.offset;
        for (i, b) in buf[..n].iter().enumerate() {
            if *b == b'\n' {
                let cr = idx.last_was_cr;
                idx.pending.push_back((start + i as u64, cr));
            }
            idx.last_was_cr = *b == b'\r';
        }
        idx.offset += n as u64;
        if idx.offset - idx.row_start > 2 * MAX_ROW_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a row runs past {MAX_ROW_BYTES} bytes"),
            ));
        }
        if idx.pending.len() > MAX_PENDING_LINES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("more than {MAX_PENDING_LINES} lines without a row ending"),
            ));
        }
        Ok(n)
    }
}

impl CsvRows {
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let io = |e: std::io::Error| DataError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let mut reader = BufReader::new(File::open(path).map_err(io)?);
        // Strip a BOM and sniff the delimiter from the first line, without consuming it.
        let head = reader.fill_buf().map_err(io)?;
        let bom = head.starts_with(b"\xEF\xBB\xBF");
        if bom {
            reader.consume(3);
        }
        let head = reader.fill_buf().map_err(io)?;
        let first = head.split(|b| *b == b'\n').next().unwrap_or(b"");
        let delimiter = sniff_delimiter(first);
        let lines = Rc::new(RefCell::new(LineIndex::default()));
        let counted = CountLines {
            inner: reader,
            lines: lines.clone(),
        };
        let records = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(delimiter)
            .from_reader(Box::new(counted) as Box<dyn Read>)
            .into_records();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            base,
            records,
            lines,
        })
    }

    fn location(&self, line: u64) -> String {
        format!("{}:{line}", self.path.display())
    }

    /// The next non-empty row as trimmed fields, with its line number.
    fn next_row(&mut self) -> Option<Result<(u64, Vec<String>), DataError>> {
        loop {
            let rec = self.records.next()?;
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    // Errors of the reader itself carry no position: the line after the last
                    // row's end.
                    let line = match e.position() {
                        Some(p) => self.lines.borrow_mut().line_of(p.byte()),
                        None => {
                            let idx = self.lines.borrow();
                            idx.before + 1 + u64::from(!idx.pending.is_empty())
                        }
                    };
                    return Some(Err(DataError::Malformed {
                        location: self.location(line),
                        msg: format!("unreadable CSV row: {e}"),
                    }));
                }
            };
            let line = rec.position().map_or(0, |p| {
                let mut idx = self.lines.borrow_mut();
                idx.row_start = p.byte();
                idx.line_of(p.byte())
            });
            // Cells are kept as written (Python's csv keeps spaces too); only blank rows are
            // skipped.
            let fields: Vec<String> = rec.iter().map(str::to_string).collect();
            if fields.iter().all(|f| f.trim().is_empty()) {
                continue;
            }
            return Some(Ok((line, fields)));
        }
    }

    /// The folder relative paths resolve against.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Non-empty rows as written, with their line numbers and the checks every role shares (two
    /// or three columns), for tools that rewrite or vet a CSV without knowing its role.
    pub fn rows(mut self) -> impl Iterator<Item = Result<(String, Vec<String>), DataError>> {
        std::iter::from_fn(move || self.next_with_columns("caption,image[,label] or item,label"))
    }

    /// The next non-empty row with its location, refused unless it has two or three columns
    /// (`shape` names them in the error).
    fn next_with_columns(
        &mut self,
        shape: &str,
    ) -> Option<Result<(String, Vec<String>), DataError>> {
        let (line, f) = match self.next_row()? {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        let loc = self.location(line);
        if f.len() < 2 || f.len() > 3 {
            return Some(Err(DataError::Malformed {
                location: loc,
                msg: format!("expected {shape}, found {} columns", f.len()),
            }));
        }
        Some(Ok((loc, f)))
    }

    /// Training pairs (caption + image, optional label).
    pub fn pairs(mut self) -> impl Iterator<Item = Result<Pair, DataError>> {
        std::iter::from_fn(move || {
            let (loc, f) = match self.next_with_columns("caption,image[,label]")? {
                Ok(x) => x,
                Err(e) => return Some(Err(e)),
            };
            let (caption, image) = match (
                looks_like_image(&f[0], &self.base),
                looks_like_image(&f[1], &self.base),
            ) {
                (false, true) => (&f[0], &f[1]),
                (true, false) => (&f[1], &f[0]),
                (true, true) => {
                    return Some(Err(DataError::Malformed {
                        location: loc,
                        msg: "both columns look like images; one must be a caption".into(),
                    }))
                }
                (false, false) => {
                    return Some(Err(DataError::Malformed {
                        location: loc,
                        msg: "neither column is an image path or URI".into(),
                    }))
                }
            };
            Some(Ok(Pair {
                caption: caption.clone(),
                image: ImageRef {
                    source: image_source(image, &self.base),
                    location: loc,
                },
                label: f
                    .get(2)
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            }))
        })
    }

    /// Labelled items of one modality, for query (text) or index (image) data.
    pub fn labeled(mut self, want: Modality) -> impl Iterator<Item = Result<Labeled, DataError>> {
        std::iter::from_fn(move || {
            let (line, f) = match self.next_row()? {
                Ok(x) => x,
                Err(e) => return Some(Err(e)),
            };
            let loc = self.location(line);
            let (item, label) = match f.len() {
                2 => (f[0].clone(), f[1].trim().to_string()),
                3 => {
                    let img_first = looks_like_image(&f[0], &self.base);
                    let (cap, img) = if img_first {
                        (&f[1], &f[0])
                    } else {
                        (&f[0], &f[1])
                    };
                    let item = if want == Modality::Text {
                        cap.clone()
                    } else {
                        img.clone()
                    };
                    (item, f[2].trim().to_string())
                }
                n => {
                    return Some(Err(DataError::Malformed {
                        location: loc,
                        msg: format!(
                            "expected item,label or caption,image,label, found {n} columns"
                        ),
                    }))
                }
            };
            if label.is_empty() {
                return Some(Err(DataError::Malformed {
                    location: loc,
                    msg: "empty label".into(),
                }));
            }
            let item = match want {
                Modality::Text => Item::Text(item),
                Modality::Image => {
                    if !looks_like_image(&item, &self.base) {
                        return Some(Err(DataError::Malformed {
                            location: loc,
                            msg: format!("{} is not an image path or URI", quoted(&item)),
                        }));
                    }
                    Item::Image(ImageRef {
                        source: image_source(&item, &self.base),
                        location: loc.clone(),
                    })
                }
            };
            Some(Ok(Labeled {
                id: loc,
                item,
                label,
                uri: None,
            }))
        })
    }
}

/// The delimiter that splits the first line into the most fields outside quotes.
fn sniff_delimiter(first_line: &[u8]) -> u8 {
    let count = |d: u8| {
        let mut quoted = false;
        first_line
            .iter()
            .filter(|&&b| {
                if b == b'"' {
                    quoted = !quoted;
                }
                !quoted && b == d
            })
            .count()
    };
    [b',', b'\t', b';', b'|']
        .into_iter()
        .max_by_key(|d| (count(*d), *d == b','))
        .unwrap_or(b',')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docarray::ImageSource;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("clipft-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn pairs_in_either_order_with_labels_quotes_and_bom() -> Result<(), Box<dyn std::error::Error>>
    {
        let p = write(
            "pairs.csv",
            "\u{feff}a red dress,img/a.png\n\nimg/b.jpg,\"blue, striped\nshirt\",shirts\n",
        );
        let rows: Vec<Pair> = CsvRows::open(&p)?.pairs().collect::<Result<_, _>>()?;
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].caption, "a red dress");
        let base = p.parent().expect("a temp file has a parent");
        assert_eq!(
            rows[0].image.source,
            ImageSource::Path(base.join("img/a.png"))
        );
        assert_eq!(rows[1].caption, "blue, striped\nshirt");
        assert_eq!(rows[1].label.as_deref(), Some("shirts"));
        assert!(
            rows[1].image.location.ends_with(":3"),
            "{}",
            rows[1].image.location
        );
        Ok(())
    }

    #[test]
    fn bad_rows_name_their_line() -> Result<(), Box<dyn std::error::Error>> {
        let p = write("bad.csv", "a caption,img/a.png\njust text,more text\n");
        let rows: Vec<_> = CsvRows::open(&p)?.pairs().collect();
        assert!(rows[0].is_ok());
        let e = rows[1].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("bad.csv:2") && e.contains("neither column"),
            "{e}"
        );
        Ok(())
    }

    /// A row too long to be a caption and an image, or a quoted cell of a million newlines, is
    /// refused naming its line, instead of growing the reader's buffers without end.
    #[test]
    fn overlong_rows_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let long = format!(
            "a caption,img/a.png\nx,{}.png\n",
            "a".repeat(2 * MAX_ROW_BYTES as usize + 1)
        );
        let p = write("long.csv", &long);
        drop(long);
        let rows: Vec<_> = CsvRows::open(&p)?.rows().collect();
        assert!(rows[0].is_ok());
        let e = rows[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("long.csv:2") && e.contains("runs past"), "{e}");
        std::fs::remove_file(p)?;
        let lines = format!(
            "a caption,img/a.png\n\"{}\",x.png\n",
            "\n".repeat(MAX_PENDING_LINES + 1)
        );
        let p = write("lines.csv", &lines);
        let rows: Vec<_> = CsvRows::open(&p)?.rows().collect();
        assert!(rows[0].is_ok());
        let e = rows[1].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("lines.csv:2") && e.contains("lines without"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn labeled_items() -> Result<(), Box<dyn std::error::Error>> {
        let p = write("q.tsv", "a red dress\tred dress\na blue hat\tblue hat\n");
        let q: Vec<Labeled> = CsvRows::open(&p)?
            .labeled(Modality::Text)
            .collect::<Result<_, _>>()?;
        assert_eq!(q[1].item, Item::Text("a blue hat".into()));
        assert_eq!(q[1].label, "blue hat");
        let p = write("i.csv", "img/x.png,red dress\n");
        let i: Vec<Labeled> = CsvRows::open(&p)?
            .labeled(Modality::Image)
            .collect::<Result<_, _>>()?;
        assert!(matches!(i[0].item, Item::Image(_)));
        let p = write("i2.csv", "a caption,red dress\n");
        let first = CsvRows::open(&p)?.labeled(Modality::Image).next();
        assert!(first.is_some_and(|r| r.is_err()));
        Ok(())
    }
}
