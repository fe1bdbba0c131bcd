//! `clipft encode`: texts and images in, JSON Lines of embeddings out, in input order.
//!
//! Inputs stream: they are read a chunk at a time, embedded and written before the next chunk
//! is read, so a file (or stdin) of any length runs in bounded memory, and a reader that
//! leaves (`| head`) stops the reading too. Which towers the inputs need is known only as they
//! come, so a tower is loaded when the first input needing it arrives.

use std::io::{BufRead, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{ArgMatches, Args};

use super::{parse_towers, ModelArgs};
use crate::model::image::open_regular_file;
use crate::model::{Encoder, Towers};

#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `clip-text`, `clip-vision` or `all`; by default only the towers the inputs need are loaded.
    #[arg(long, env = "CLIPFT_SELECT_MODEL", value_parser = parse_towers)]
    pub select_model: Option<Towers>,
    /// A text to embed (repeatable).
    #[arg(long = "text", env = "CLIPFT_TEXT")]
    pub text: Vec<String>,
    /// An image file to embed (repeatable).
    #[arg(long = "image", env = "CLIPFT_IMAGE")]
    pub image: Vec<PathBuf>,
    /// A regular file with one input per line, or `-` for stdin: an image path when the line
    /// ends in an image extension (.jpg, .jpeg, .png, .webp, .gif, .bmp) and has no spaces, a
    /// text otherwise. Blank lines are skipped; an image path that does not exist is an error,
    /// not a text. A line holds at most --max-text-bytes bytes, or 4096 (an image path) where
    /// that is lower. Read and written a chunk at a time, so any length fits in memory.
    #[arg(long, env = "CLIPFT_INPUT")]
    pub input: Option<PathBuf>,
    /// Where to write the JSON Lines (stdout by default). Its variable names the command:
    /// `CLIPFT_OUTPUT` is the artifacts folder of `fit`.
    #[arg(long, env = "CLIPFT_ENCODE_OUTPUT")]
    pub output: Option<PathBuf>,
    /// Inputs per forward pass (`CLIPFT_BATCH_SIZE` is the training batch of `fit`).
    #[arg(long, env = "CLIPFT_ENCODE_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub batch_size: u64,
}

/// One thing to embed.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Image(PathBuf),
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp"];

/// The longest line `--input` reads when `--max-text-bytes` is lower: room for an image path
/// (Linux's PATH_MAX).
const MAX_PATH_LINE_BYTES: usize = 4096;

/// Inputs embedded and written together: batches of similar texts form within a chunk. With
/// the bytes cap, a chunk of long lines stays small in memory.
const CHUNK_BATCHES: usize = 8;
const CHUNK_BYTES: usize = 64 << 20;

/// Whether an `--input` line means an image file: an image extension and, unless the file
/// exists, no whitespace (a caption such as "a photo of dog.jpg on a table" stays a text).
fn is_image_path(line: &str) -> bool {
    let p = Path::new(line);
    let ext_ok = p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false);
    ext_ok && (p.is_file() || !line.chars().any(char::is_whitespace))
}

/// The `--text` and `--image` inputs in command-line order (interleaved as given).
fn command_line_inputs(args: &EncodeArgs, matches: Option<&ArgMatches>) -> Vec<Input> {
    let mut ordered: Vec<(usize, Input)> = Vec::new();
    let idx = |id: &str, n: usize| -> Vec<usize> {
        matches
            .and_then(|m| m.indices_of(id))
            .map(|i| i.collect())
            .filter(|v: &Vec<usize>| v.len() == n)
            .unwrap_or_else(|| (0..n).collect())
    };
    for (i, t) in idx("text", args.text.len()).into_iter().zip(&args.text) {
        ordered.push((i, Input::Text(t.clone())));
    }
    let offset = if matches.is_some() {
        0
    } else {
        args.text.len()
    };
    for (i, p) in idx("image", args.image.len()).into_iter().zip(&args.image) {
        ordered.push((i + offset, Input::Image(p.clone())));
    }
    ordered.sort_by_key(|(i, _)| *i);
    ordered.into_iter().map(|(_, x)| x).collect()
}

/// The inputs of `--input`, one per non-blank line, each line at most `max_line` bytes. Lines
/// used to be read whole, however long, so a file without a newline (`/dev/zero`) was read
/// into one string until an allocation failed and the process aborted.
struct InputLines<R> {
    reader: R,
    /// The file's name in errors (`stdin` for `-`).
    name: String,
    max_line: usize,
    line: usize,
    buf: Vec<u8>,
    done: bool,
}

impl<R: BufRead> InputLines<R> {
    fn new(reader: R, name: String, max_line: usize) -> Self {
        Self {
            reader,
            name,
            max_line,
            line: 0,
            buf: Vec::new(),
            done: false,
        }
    }

    /// The next line's input; None at the end or for a blank line.
    fn read_one(&mut self) -> anyhow::Result<Option<Input>> {
        use std::io::Read;
        self.line += 1;
        let (n, name, max_line) = (self.line, &self.name, self.max_line);
        self.buf.clear();
        // Room for the longest line and its "\r\n": a line that fills it is too long.
        let read = (&mut self.reader)
            .take((max_line as u64).saturating_add(2))
            .read_until(b'\n', &mut self.buf)
            .with_context(|| format!("{name}: line {n}"))?;
        if read == 0 {
            self.done = true;
            return Ok(None);
        }
        let mut bytes = self.buf.as_slice();
        bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        if bytes.len() > max_line {
            anyhow::bail!(
                "{name} line {n} is longer than {max_line} bytes, the most a line may hold \
                 (--max-text-bytes, or {MAX_PATH_LINE_BYTES} for an image path where that is lower)"
            );
        }
        let line = std::str::from_utf8(bytes).with_context(|| format!("{name}: line {n}"))?;
        if line.trim().is_empty() {
            return Ok(None);
        }
        if !is_image_path(line) {
            Ok(Some(Input::Text(line.to_string())))
        } else if Path::new(line).is_file() {
            Ok(Some(Input::Image(line.into())))
        } else {
            anyhow::bail!(
                "{name} line {n}: {line} looks like an image path, but there is no such file"
            )
        }
    }
}

impl<R: BufRead> Iterator for InputLines<R> {
    type Item = anyhow::Result<Input>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.read_one() {
                Ok(Some(x)) => return Some(Ok(x)),
                Ok(None) => continue,
                Err(e) => {
                    // An unreadable or refused line ends the input.
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

/// The lines of `--input`: a regular file only ([`open_regular_file`]: `/dev/zero` never
/// ends and a FIFO named by mistake would block), or stdin for `-`, which is whatever the
/// user pipes in.
fn input_lines(
    path: &Path,
    max_line: usize,
) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<Input>>>> {
    if path == Path::new("-") {
        let stdin = std::io::stdin().lock();
        return Ok(Box::new(InputLines::new(stdin, "stdin".into(), max_line)));
    }
    let f = open_regular_file(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(Box::new(InputLines::new(
        std::io::BufReader::new(f),
        path.display().to_string(),
        max_line,
    )))
}

/// Embeds every input, batching texts by token length and preprocessing images in parallel.
/// `first_text` numbers the first text in errors (`text N`), counting from the first input.
pub fn encode_inputs(
    enc: &Encoder,
    inputs: &[Input],
    batch: usize,
    first_text: usize,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); inputs.len()];
    let (mut text_pos, mut texts, mut image_pos, mut images) = (vec![], vec![], vec![], vec![]);
    for (i, x) in inputs.iter().enumerate() {
        match x {
            Input::Text(t) => {
                text_pos.push(i);
                texts.push(t.as_str());
            }
            Input::Image(p) => {
                image_pos.push(i);
                images.push(p.as_path());
            }
        }
    }
    if !texts.is_empty() {
        let e = enc.embed_texts_numbered(&texts, first_text, batch, &mut |_| {})?;
        for (i, e) in text_pos.into_iter().zip(e) {
            out[i] = e;
        }
    }
    if !images.is_empty() {
        let e =
            enc.embed_images_batched(&images, batch, |p, pre| pre.preprocess_file(p), &mut |_| {})?;
        for (i, e) in image_pos.into_iter().zip(e) {
            out[i] = e;
        }
    }
    Ok(out)
}

/// The model, loaded with the towers the inputs so far needed (or those `--select-model`
/// names), and loaded again with both when a later input needs the other tower.
struct LazyEncoder<'a> {
    model: &'a ModelArgs,
    select: Option<Towers>,
    loaded: Option<(Towers, Encoder)>,
}

impl LazyEncoder<'_> {
    fn for_inputs(&mut self, inputs: &[Input]) -> anyhow::Result<&Encoder> {
        let have = self.loaded.as_ref().map(|(t, _)| *t);
        let want = self.select.unwrap_or_else(|| {
            let had = have.unwrap_or(Towers {
                text: false,
                vision: false,
            });
            Towers {
                text: had.text || inputs.iter().any(|x| matches!(x, Input::Text(_))),
                vision: had.vision || inputs.iter().any(|x| matches!(x, Input::Image(_))),
            }
        });
        if have != Some(want) {
            // The smaller model goes before the larger one loads.
            self.loaded = None;
            let (files, opts) = self.model.resolve(want)?;
            self.loaded = Some((want, Encoder::load(&files, &opts)?));
        }
        match &self.loaded {
            Some((_, enc)) => Ok(enc),
            None => anyhow::bail!("the model did not load"),
        }
    }
}

pub fn run(args: EncodeArgs, matches: Option<&ArgMatches>) -> anyhow::Result<()> {
    let max_line = args.model.max_text_bytes.max(MAX_PATH_LINE_BYTES);
    let lines = match &args.input {
        Some(path) => input_lines(path, max_line)?,
        None => Box::new(std::iter::empty()),
    };
    let mut inputs = command_line_inputs(&args, matches)
        .into_iter()
        .map(Ok)
        .chain(lines)
        .peekable();
    if inputs.peek().is_none() {
        anyhow::bail!("nothing to encode: give --text, --image or --input");
    }
    let batch = args.batch_size as usize;
    // Typed at a terminal, each line is answered at once; otherwise a chunk fills first.
    let interactive =
        args.input.as_deref() == Some(Path::new("-")) && std::io::stdin().is_terminal();
    let chunk_len = if interactive {
        1
    } else {
        batch * CHUNK_BATCHES
    };
    let sink: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = BufWriter::new(sink);
    let mut model = LazyEncoder {
        model: &args.model,
        select: args.select_model,
        loaded: None,
    };
    let (mut written, mut texts_seen) = (0usize, 0usize);
    loop {
        let (mut chunk, mut bytes, mut failed) = (Vec::new(), 0, None);
        while chunk.len() < chunk_len && bytes < CHUNK_BYTES {
            match inputs.next() {
                Some(Ok(x)) => {
                    bytes += match &x {
                        Input::Text(t) => t.len(),
                        Input::Image(p) => p.as_os_str().len(),
                    };
                    chunk.push(x);
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                None => break,
            }
        }
        if !chunk.is_empty() {
            // What came before a bad line is embedded and written first.
            let result = model
                .for_inputs(&chunk)
                .and_then(|enc| encode_inputs(enc, &chunk, batch, texts_seen + 1))
                .and_then(|embeddings| write_lines(&mut w, &chunk, embeddings));
            if let Err(e) = result {
                return Err(partial(e, written, args.output.as_deref()));
            }
            written += chunk.len();
            texts_seen += chunk.iter().filter(|x| matches!(x, Input::Text(_))).count();
        }
        if let Some(e) = failed {
            return Err(partial(e, written, args.output.as_deref()));
        }
        if chunk.is_empty() {
            return Ok(());
        }
    }
}

/// One JSON line per input, then a flush, so a reader downstream sees each chunk as it ends.
fn write_lines(
    w: &mut impl Write,
    inputs: &[Input],
    embeddings: Vec<Vec<f32>>,
) -> anyhow::Result<()> {
    for (input, emb) in inputs.iter().zip(embeddings) {
        let line = match input {
            Input::Text(t) => serde_json::json!({"text": t, "embedding": emb}),
            Input::Image(p) => {
                serde_json::json!({"image": p.display().to_string(), "embedding": emb})
            }
        };
        serde_json::to_writer(&mut *w, &line)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

/// An error after some output was written says how much of it there is: the lines before are
/// whole and in order, and a rerun on the rest can continue from there.
fn partial(e: anyhow::Error, written: usize, output: Option<&Path>) -> anyhow::Error {
    match (written, output) {
        (0, _) => e,
        (n, Some(p)) => e.context(format!(
            "stopped after the first {n} inputs; their embeddings are in {}",
            p.display()
        )),
        (n, None) => e.context(format!(
            "stopped after the first {n} inputs (written above)"
        )),
    }
}
