//! `clipft encode`: texts and images in, JSON Lines of embeddings out, in input order.

use std::io::{BufRead, BufWriter, Write};
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
    /// A regular file with one input per line: an image path when the line ends in an image
    /// extension (.jpg, .jpeg, .png, .webp, .gif, .bmp) and has no spaces, a text otherwise.
    /// Blank lines are skipped; an image path that does not exist is an error, not a text. A
    /// line holds at most --max-text-bytes bytes, or 4096 (an image path) where that is lower.
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

/// The inputs in command-line order (`--text` and `--image` interleaved as given), then the lines
/// of `--input`.
fn collect_inputs(args: &EncodeArgs, matches: Option<&ArgMatches>) -> anyhow::Result<Vec<Input>> {
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
    let mut inputs: Vec<Input> = ordered.into_iter().map(|(_, x)| x).collect();
    if let Some(path) = &args.input {
        let max_line = args.model.max_text_bytes.max(MAX_PATH_LINE_BYTES);
        inputs.extend(read_input_file(path, max_line)?);
    }
    Ok(inputs)
}

/// The inputs of an `--input` file, a regular file only ([`open_regular_file`]) whose lines are
/// at most `max_line` bytes. Lines used to be read whole, however long, so a file without a
/// newline (`/dev/zero`) was read into one string until an allocation failed and the process
/// aborted.
fn read_input_file(path: &Path, max_line: usize) -> anyhow::Result<Vec<Input>> {
    use std::io::Read;
    let f = open_regular_file(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = std::io::BufReader::new(f);
    let mut inputs = Vec::new();
    let mut buf = Vec::new();
    for n in 1.. {
        buf.clear();
        // Room for the longest line and its "\r\n": a line that fills it is too long.
        let read = (&mut reader)
            .take((max_line as u64).saturating_add(2))
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{}: line {n}", path.display()))?;
        if read == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        if buf.len() > max_line {
            anyhow::bail!(
                "{} line {n} is longer than {max_line} bytes, the most a line may hold \
                 (--max-text-bytes, or {MAX_PATH_LINE_BYTES} for an image path where that is lower)",
                path.display()
            );
        }
        let line =
            std::str::from_utf8(&buf).with_context(|| format!("{}: line {n}", path.display()))?;
        let line = line.strip_suffix('\r').unwrap_or(line).to_string();
        if line.trim().is_empty() {
            continue;
        }
        if !is_image_path(&line) {
            inputs.push(Input::Text(line));
        } else if Path::new(&line).is_file() {
            inputs.push(Input::Image(line.into()));
        } else {
            anyhow::bail!(
                "{} line {n}: {line} looks like an image path, but there is no such file",
                path.display()
            );
        }
    }
    Ok(inputs)
}

/// Embeds every input, batching texts by token length and preprocessing images in parallel.
pub fn encode_inputs(
    enc: &Encoder,
    inputs: &[Input],
    batch: usize,
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
        let e = enc.embed_texts_batched(&texts, batch, &mut |_| {})?;
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

pub fn run(args: EncodeArgs, matches: Option<&ArgMatches>) -> anyhow::Result<()> {
    let inputs = collect_inputs(&args, matches)?;
    if inputs.is_empty() {
        anyhow::bail!("nothing to encode: give --text, --image or --input");
    }
    let towers = args.select_model.unwrap_or(Towers {
        text: inputs.iter().any(|x| matches!(x, Input::Text(_))),
        vision: inputs.iter().any(|x| matches!(x, Input::Image(_))),
    });
    let (files, opts) = args.model.resolve(towers)?;
    let enc = Encoder::load(&files, &opts)?;
    let embeddings = encode_inputs(&enc, &inputs, args.batch_size as usize)?;
    let sink: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = BufWriter::new(sink);
    for (input, emb) in inputs.iter().zip(embeddings) {
        let line = match input {
            Input::Text(t) => serde_json::json!({"text": t, "embedding": emb}),
            Input::Image(p) => {
                serde_json::json!({"image": p.display().to_string(), "embedding": emb})
            }
        };
        serde_json::to_writer(&mut w, &line)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}
