//! Image preprocessing with the same pixels as transformers' `CLIPImageProcessor` (PIL path).
//!
//! Decode -> RGB as transformers' `convert_to_rgb` (grey replicated, alpha composited on white) ->
//! resize so the short side is `shortest_edge` with PIL's bicubic resampling -> centre crop ->
//! rescale -> normalise with the config's mean/std, channels first.
//!
//! The resize is a re-implementation of Pillow's `ImagingResample` for 8-bit images: separable
//! convolution with Keys' cubic (a = -0.5), the kernel widened by the scale factor when shrinking
//! (antialiasing), 22-bit fixed-point weights, horizontal pass first with a uint8 intermediate. The
//! `image` crate's CatmullRom filter is the same cubic but rounds differently and filters in the
//! other order, which shifts pixels by a few levels; here the output matches Pillow's.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageReader, RgbImage};
use serde::Deserialize;

use crate::model::ModelError;

/// Default cap on decoded pixels (width x height): PIL warns at 89 M and refuses at twice that;
/// we refuse a little earlier, before allocating.
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// The largest file an image within `max_pixels` can be stored in: eight bytes a pixel (16-bit
/// RGBA, uncompressed) plus room for headers and metadata. A bigger file cannot decode within
/// the pixel limit, so it is refused before it is read.
pub fn max_file_bytes(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(8).saturating_add(16 << 20)
}

/// Opens `path` for reading only if it is a regular file: a FIFO would block the reader forever
/// and a device (`/dev/zero`) never ends. The file is opened without blocking (opening a FIFO
/// with no writer would block) and checked on the opened handle, so a path swapped after a
/// check cannot slip through.
pub fn open_regular_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::io::{Error, ErrorKind};
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.custom_flags(libc::O_NONBLOCK);
    }
    let file = open.open(path)?;
    if !file.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(file)
}

/// Reads an image file of at most `max_bytes`, a regular file only ([`open_regular_file`]);
/// the read stops at the limit whatever the size claimed.
pub fn read_file(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let file = open_regular_file(path)?;
    let meta = file.metadata()?;
    let over = |n: u64| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{n} bytes, over the {max_bytes} bytes an image within the pixel limit can take (--max-image-pixels)"),
        )
    };
    if meta.len() > max_bytes {
        return Err(over(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(over(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The preprocessing parameters, from `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    pub shortest_edge: u32,
    pub crop_height: u32,
    pub crop_width: u32,
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub rescale_factor: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for ImageConfig {
    /// openai/clip-vit-base-patch32's values.
    fn default() -> Self {
        Self {
            shortest_edge: 224,
            crop_height: 224,
            crop_width: 224,
            do_resize: true,
            do_center_crop: true,
            rescale_factor: 1.0 / 255.0,
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(u32),
    Map {
        shortest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
    },
}

#[derive(Deserialize)]
struct RawPreprocessor {
    size: Option<SizeSpec>,
    crop_size: Option<SizeSpec>,
    do_resize: Option<bool>,
    do_center_crop: Option<bool>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f32>,
    do_normalize: Option<bool>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    resample: Option<u32>,
}

impl ImageConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| ModelError::Config {
            path: path.into(),
            msg,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, String> {
        let raw: RawPreprocessor = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut c = Self::default();
        if let Some(r) = raw.resample {
            if r != 3 {
                return Err(format!(
                    "resample {r} is not supported: only 3 (bicubic) is"
                ));
            }
        }
        match raw.size {
            Some(SizeSpec::Int(s))
            | Some(SizeSpec::Map {
                shortest_edge: Some(s),
                ..
            }) => c.shortest_edge = s,
            Some(SizeSpec::Map {
                height: Some(h),
                width: Some(w),
                ..
            }) if h == w => c.shortest_edge = h,
            Some(SizeSpec::Map { .. }) => {
                return Err("size must be {\"shortest_edge\": N} or a square".into())
            }
            None => {}
        }
        match raw.crop_size {
            Some(SizeSpec::Int(s)) => (c.crop_height, c.crop_width) = (s, s),
            Some(SizeSpec::Map {
                height: Some(h),
                width: Some(w),
                ..
            }) => (c.crop_height, c.crop_width) = (h, w),
            Some(SizeSpec::Map { .. }) => return Err("crop_size needs height and width".into()),
            None => {}
        }
        c.do_resize = raw.do_resize.unwrap_or(true);
        c.do_center_crop = raw.do_center_crop.unwrap_or(true);
        c.rescale_factor = if raw.do_rescale.unwrap_or(true) {
            raw.rescale_factor.unwrap_or(1.0 / 255.0)
        } else {
            1.0
        };
        if raw.do_normalize.unwrap_or(true) {
            c.mean = raw.image_mean.unwrap_or(c.mean);
            c.std = raw.image_std.unwrap_or(c.std);
        } else {
            (c.mean, c.std) = ([0.0; 3], [1.0; 3]);
        }
        if c.shortest_edge == 0 || c.crop_height == 0 || c.crop_width == 0 {
            return Err("sizes must be positive".into());
        }
        if c.std.contains(&0.0) {
            return Err("image_std must not contain zero".into());
        }
        Ok(c)
    }

    /// Whether the images this makes are `side` x `side`, what a vision tower of that
    /// `image_size` takes; batches are built at the crop size whether or not the crop is on.
    pub fn fits_tower(&self, side: usize) -> Result<(), String> {
        let (h, w) = (self.crop_height as usize, self.crop_width as usize);
        if (h, w) != (side, side) {
            return Err(format!(
                "crop_size {w}x{h} does not match the {side}x{side} images the vision tower \
                 takes (vision_config.image_size {side})"
            ));
        }
        if !self.do_center_crop && self.do_resize && self.shortest_edge as usize != side {
            return Err(format!(
                "without a centre crop, size.shortest_edge {} must be the vision tower's image \
                 side, {side} (vision_config.image_size)",
                self.shortest_edge
            ));
        }
        Ok(())
    }
}

/// Turns images into the vision tower's input.
#[derive(Debug, Clone)]
pub struct ImagePreprocessor {
    pub config: ImageConfig,
    pub max_pixels: u64,
}

impl ImagePreprocessor {
    pub fn new(config: ImageConfig) -> Self {
        Self {
            config,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// Side lengths of the output, `(height, width)`.
    pub fn output_size(&self) -> (usize, usize) {
        (
            self.config.crop_height as usize,
            self.config.crop_width as usize,
        )
    }

    /// Decodes an encoded image (JPEG, PNG, WebP, GIF first frame, BMP) to RGB, refusing images
    /// over the pixel limit before their pixels are allocated.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage, ModelError> {
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ModelError::Image {
                msg: format!("cannot read image: {e}"),
            })?;
        if reader.format().is_none() {
            return Err(ModelError::Image {
                msg: "unrecognised image format".into(),
            });
        }
        let (w, h) = reader.into_dimensions().map_err(|e| ModelError::Image {
            msg: format!("cannot decode image: {e}"),
        })?;
        self.check_pixels(w as u64, h as u64)?;
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ModelError::Image {
                msg: format!("cannot read image: {e}"),
            })?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(w);
        limits.max_image_height = Some(h);
        limits.max_alloc = Some(self.max_pixels.saturating_mul(16).max(1 << 20));
        reader.limits(limits);
        let img = reader.decode().map_err(|e| ModelError::Image {
            msg: format!("cannot decode image: {e}"),
        })?;
        Ok(to_rgb(img))
    }

    fn check_pixels(&self, w: u64, h: u64) -> Result<(), ModelError> {
        if w == 0 || h == 0 {
            return Err(ModelError::Image {
                msg: format!("image has no pixels ({w}x{h})"),
            });
        }
        if w.saturating_mul(h) > self.max_pixels {
            return Err(ModelError::Image {
                msg: format!(
                    "image of {w}x{h} = {} pixels is over the limit of {} pixels",
                    w * h,
                    self.max_pixels
                ),
            });
        }
        Ok(())
    }

    /// Reads an image file, no bigger than an image within the pixel limit can be
    /// ([`read_file`]).
    pub fn read_file(&self, path: &Path) -> Result<Vec<u8>, ModelError> {
        read_file(path, max_file_bytes(self.max_pixels)).map_err(|e| ModelError::io(path, e))
    }

    /// Reads and preprocesses an image file.
    pub fn preprocess_file(&self, path: &Path) -> Result<Vec<f32>, ModelError> {
        let bytes = self.read_file(path)?;
        let rgb = self.decode(&bytes).map_err(|e| match e {
            ModelError::Image { msg } => ModelError::Image {
                msg: format!("{}: {msg}", path.display()),
            },
            other => other,
        })?;
        self.preprocess_rgb(&rgb)
    }

    /// Decodes and preprocesses encoded image bytes.
    pub fn preprocess_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
        self.preprocess_rgb(&self.decode(bytes)?)
    }

    /// An image given as a raw `[height, width, channels]` uint8 array (channels 1, 3 or 4), as
    /// clip-as-service accepts in `Document.tensor`.
    pub fn preprocess_hwc_u8(
        &self,
        data: &[u8],
        height: usize,
        width: usize,
        channels: usize,
    ) -> Result<Vec<f32>, ModelError> {
        self.check_pixels(width as u64, height as u64)?;
        if height
            .checked_mul(width)
            .and_then(|p| p.checked_mul(channels))
            != Some(data.len())
        {
            return Err(ModelError::Image {
                msg: format!(
                    "tensor of {} bytes does not match shape [{height}, {width}, {channels}]",
                    data.len()
                ),
            });
        }
        let rgb: Vec<u8> = match channels {
            1 => data.iter().flat_map(|&v| [v, v, v]).collect(),
            3 => data.to_vec(),
            4 => data
                .chunks_exact(4)
                .flat_map(|p| {
                    [
                        on_white(p[0], p[3]),
                        on_white(p[1], p[3]),
                        on_white(p[2], p[3]),
                    ]
                })
                .collect(),
            c => {
                return Err(ModelError::Image {
                    msg: format!("image tensors need 1, 3 or 4 channels, got {c}"),
                })
            }
        };
        let img = RgbImage::from_raw(width as u32, height as u32, rgb).ok_or_else(|| {
            ModelError::Image {
                msg: "tensor shape does not match data".into(),
            }
        })?;
        self.preprocess_rgb(&img)
    }

    /// Resized and cropped RGB pixels before rescaling/normalising (what the parity tests
    /// compare with Pillow's output).
    ///
    /// Only the window that the centre crop keeps is resampled: Pillow's filters are separable
    /// and each output pixel depends only on its own taps, so the window's pixels are the ones a
    /// full resize followed by the crop gives, and the work is bounded by the crop size however
    /// extreme the aspect ratio (a 200000x1 strip would otherwise be resized to 44.8 M x 224
    /// pixels before 224x224 of them are kept).
    pub fn resize_and_crop(&self, img: &RgbImage) -> Result<RgbImage, ModelError> {
        let c = &self.config;
        let (w, h) = img.dimensions();
        let (nh, nw) = if c.do_resize {
            resize_output_size(h, w, c.shortest_edge)
        } else {
            (h as u64, w as u64)
        };
        let (crop_h, crop_w) = if c.do_center_crop {
            (c.crop_height as u64, c.crop_width as u64)
        } else {
            (nh, nw)
        };
        // The output is the crop, or without one the whole resized image: hold it to the pixel
        // limit, naming whichever it is.
        if crop_h.saturating_mul(crop_w) > self.max_pixels
            || crop_h > u32::MAX as u64
            || crop_w > u32::MAX as u64
        {
            let msg = match c.do_center_crop {
                true => format!(
                    "the centre crop of {crop_w}x{crop_h} = {} pixels (crop_size) is over the limit of {} pixels",
                    crop_w.saturating_mul(crop_h),
                    self.max_pixels
                ),
                false => format!(
                    "image of {w}x{h} would be resized to {nw}x{nh} = {} pixels, over the limit of {} pixels",
                    nw.saturating_mul(nh),
                    self.max_pixels
                ),
            };
            return Err(ModelError::Image { msg });
        }
        // transformers' `center_crop`: floor offsets, zero padding where the image is smaller.
        let top = (nh as i128 - crop_h as i128).div_euclid(2);
        let left = (nw as i128 - crop_w as i128).div_euclid(2);
        let rows = Span::clip(top, crop_h, nh);
        let cols = Span::clip(left, crop_w, nw);
        let window = if c.do_resize {
            resize_bicubic_window(img, (nw, nh), cols, rows)
        } else {
            copy_window(img, cols, rows)
        };
        if (cols.len, rows.len) == (crop_w, crop_h) {
            return Ok(window);
        }
        // Padding: place the window where the crop puts it.
        let mut out = RgbImage::new(crop_w as u32, crop_h as u32);
        let (dx, dy) = (
            (cols.start as i128 - left) as u32,
            (rows.start as i128 - top) as u32,
        );
        for (x, y, p) in window.enumerate_pixels() {
            out.put_pixel(x + dx, y + dy, *p);
        }
        Ok(out)
    }

    /// Channels-first normalised pixels, `[3, crop_h, crop_w]` flattened.
    pub fn preprocess_rgb(&self, img: &RgbImage) -> Result<Vec<f32>, ModelError> {
        let c = &self.config;
        let out = self.resize_and_crop(img)?;
        let (w, h) = out.dimensions();
        // Without a centre crop (a config may turn it off) a non-square image keeps its shape;
        // batches hold the crop size, and one such image failed its whole batch, other
        // clients' images included.
        let (want_h, want_w) = self.output_size();
        if (h as usize, w as usize) != (want_h, want_w) {
            return Err(ModelError::Image {
                msg: format!(
                    "the image ({}x{}) becomes {w}x{h} pixels, but the model takes                      {want_w}x{want_h}: its preprocessor config has no centre crop, so only                      images of the model's shape fit",
                    img.width(),
                    img.height()
                ),
            });
        }
        let plane = (w * h) as usize;
        let mut chw = vec![0f32; 3 * plane];
        for (i, px) in out.pixels().enumerate() {
            for ch in 0..3 {
                let v = px.0[ch] as f32 * c.rescale_factor;
                chw[ch * plane + i] = (v - c.mean[ch]) / c.std[ch];
            }
        }
        Ok(chw)
    }
}

/// transformers' `convert_to_rgb`: images with an alpha channel are composited onto white (with
/// Pillow's `alpha_composite` arithmetic, so the pixels match exactly); grey is replicated.
/// clip-as-service's `convert("RGB")` drops alpha instead, which differs only for transparent
/// pixels.
fn to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return match img {
            DynamicImage::ImageRgb8(i) => i,
            other => other.to_rgb8(),
        };
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = p.0;
        o.0 = [on_white(r, a), on_white(g, a), on_white(b, a)];
    }
    out
}

/// One channel of Pillow's `ImagingAlphaComposite` with an opaque white background.
fn on_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const BITS: u32 = 7;
    let (c, a) = (c as u32, a as u32);
    let coef1 = a << BITS;
    let coef2 = (255 << BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> BITS) as u8
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side becomes
/// `shortest_edge`, the long side `int(shortest_edge * long / short)` (floored). Returns (h, w),
/// in `u64` because a thin strip's long side can pass `u32::MAX` (only the crop is computed).
pub fn resize_output_size(height: u32, width: u32, shortest_edge: u32) -> (u64, u64) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_short = shortest_edge as u64;
    let new_long = ((shortest_edge as u64 * long as u64) as f64 / short as f64) as u64;
    if width <= height {
        (new_long, new_short)
    } else {
        (new_short, new_long)
    }
}

/// A run of indices `[start, start + len)` along one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub len: u64,
}

impl Span {
    /// The part of `[offset, offset + len)` inside `[0, size)`.
    fn clip(offset: i128, len: u64, size: u64) -> Self {
        let start = offset.clamp(0, size as i128);
        let end = (offset + len as i128).clamp(start, size as i128);
        Self {
            start: start as u64,
            len: (end - start) as u64,
        }
    }
}

/// The pixels of `img` in the window (which lies inside it).
fn copy_window(img: &RgbImage, cols: Span, rows: Span) -> RgbImage {
    RgbImage::from_fn(cols.len as u32, rows.len as u32, |x, y| {
        *img.get_pixel(cols.start as u32 + x, rows.start as u32 + y)
    })
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: first input index, tap count, and `ksize` fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` for the outputs `[window.start, window.start + window.len)` of a
/// resize from `in_size` to `out_size`.
fn precompute_coeffs(in_size: usize, out_size: u64, window: Span) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let n = window.len as usize;
    let mut bounds = Vec::with_capacity(n);
    let mut weights = vec![0i32; n * ksize];
    let mut k = vec![0f64; ksize];
    for i in 0..n {
        let xx = window.start + i as u64;
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            let v = if x < xmax && ww != 0.0 {
                k[x] / ww
            } else if x < xmax {
                k[x]
            } else {
                0.0
            };
            let scaled = v * (1u32 << PRECISION_BITS) as f64;
            weights[i * ksize + x] = if v < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs {
        bounds,
        weights,
        ksize,
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's bicubic `Image.resize` on an RGB image (no `reducing_gap`).
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let full = |len: u32| Span {
        start: 0,
        len: len as u64,
    };
    resize_bicubic_window(img, (out_w as u64, out_h as u64), full(out_w), full(out_h))
}

/// The window `cols` x `rows` (inside `out_w x out_h`) of Pillow's bicubic resize of `img` to
/// `(out_w, out_h)`: the same pixels as the full resize, with work and memory bounded by the
/// window. As Pillow does, the horizontal pass runs first (on just the input rows the vertical
/// pass reads) into a uint8 intermediate.
pub fn resize_bicubic_window(
    img: &RgbImage,
    (out_w, out_h): (u64, u64),
    cols: Span,
    rows: Span,
) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    // Input rows the vertical pass needs, and its coefficients relative to the first of them.
    let (vert, first_row, n_rows) = if out_h != in_h as u64 {
        let co = precompute_coeffs(in_h, out_h, rows);
        let first = co.bounds.first().map_or(0, |b| b.0);
        let end = co.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(first);
        (Some(co), first, end - first)
    } else {
        (None, rows.start as usize, rows.len as usize)
    };
    let ow = cols.len as usize;
    // Horizontal pass: `n_rows` rows from `first_row`, the window's columns.
    let mut mid = vec![0u8; ow * n_rows * 3];
    if out_w != in_w as u64 {
        let co = precompute_coeffs(in_w, out_w, cols);
        for y in 0..n_rows {
            let row = &src[(first_row + y) * in_w * 3..(first_row + y + 1) * in_w * 3];
            for (xx, &(xmin, xmax)) in co.bounds.iter().enumerate() {
                let k = &co.weights[xx * co.ksize..xx * co.ksize + xmax];
                for c in 0..3 {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (x, &w) in k.iter().enumerate() {
                        acc += row[(xmin + x) * 3 + c] as i32 * w;
                    }
                    mid[(y * ow + xx) * 3 + c] = clip8(acc);
                }
            }
        }
    } else {
        let x0 = cols.start as usize * 3;
        for y in 0..n_rows {
            let row = (first_row + y) * in_w * 3;
            mid[y * ow * 3..(y + 1) * ow * 3].copy_from_slice(&src[row + x0..row + x0 + ow * 3]);
        }
    }
    let Some(co) = vert else {
        return RgbImage::from_raw(ow as u32, n_rows as u32, mid)
            .expect("buffer sized to the window");
    };
    let oh = rows.len as usize;
    let mut out = vec![0u8; ow * oh * 3];
    for (yy, &(ymin, ymax)) in co.bounds.iter().enumerate() {
        let k = &co.weights[yy * co.ksize..yy * co.ksize + ymax];
        let base = ymin - first_row;
        for x in 0..ow * 3 {
            let mut acc: i32 = 1 << (PRECISION_BITS - 1);
            for (y, &w) in k.iter().enumerate() {
                acc += mid[(base + y) * ow * 3 + x] as i32 * w;
            }
            out[yy * ow * 3 + x] = clip8(acc);
        }
    }
    RgbImage::from_raw(ow as u32, oh as u32, out).expect("buffer sized to the window")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' `center_crop`: floor offsets, zero padding when the image is smaller.
    fn center_crop(img: &RgbImage, crop_h: u32, crop_w: u32) -> RgbImage {
        let (w, h) = img.dimensions();
        let top = (h as i64 - crop_h as i64).div_euclid(2);
        let left = (w as i64 - crop_w as i64).div_euclid(2);
        let mut out = RgbImage::new(crop_w, crop_h);
        for y in 0..crop_h as i64 {
            let sy = y + top;
            if sy < 0 || sy >= h as i64 {
                continue;
            }
            for x in 0..crop_w as i64 {
                let sx = x + left;
                if sx < 0 || sx >= w as i64 {
                    continue;
                }
                out.put_pixel(x as u32, y as u32, *img.get_pixel(sx as u32, sy as u32));
            }
        }
        out
    }

    #[test]
    fn output_sizes_floor_the_long_side() {
        assert_eq!(resize_output_size(480, 640, 224), (224, 298));
        assert_eq!(resize_output_size(480, 64, 224), (1680, 224));
        assert_eq!(resize_output_size(333, 225, 224), (331, 224));
        assert_eq!(resize_output_size(224, 224, 224), (224, 224));
        assert_eq!(resize_output_size(1, 64 << 20, 224), (224, 224 << 26));
    }

    #[test]
    fn identity_resize_and_constant_image() {
        let img = RgbImage::from_fn(10, 7, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 5]));
        assert_eq!(resize_bicubic(&img, 10, 7), img);
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 77]));
        let out = resize_bicubic(&flat, 11, 50);
        assert!(out.pixels().all(|p| p.0 == [200, 10, 77]));
    }

    /// A deterministic image with detail everywhere, so a misplaced tap changes pixels.
    fn noise(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = x
                .wrapping_mul(2_654_435_761)
                .wrapping_add(y.wrapping_mul(40_503));
            image::Rgb([(v >> 3) as u8, (v >> 11) as u8, (v >> 19) as u8])
        })
    }

    /// The cropped window must be exactly the crop of a full resize, for shrinking, enlarging,
    /// odd sizes, both orientations, and crops larger than the resized image (padding).
    #[test]
    fn window_resize_equals_full_resize_then_crop() {
        let configs = [
            ImageConfig::default(),
            ImageConfig {
                shortest_edge: 30,
                crop_height: 24,
                crop_width: 17,
                ..ImageConfig::default()
            },
            ImageConfig {
                shortest_edge: 20,
                crop_height: 26,
                crop_width: 41,
                ..ImageConfig::default()
            },
            ImageConfig {
                do_resize: false,
                crop_height: 9,
                crop_width: 12,
                ..ImageConfig::default()
            },
        ];
        let shapes = [
            (640, 480),
            (225, 333),
            (48, 17),
            (17, 48),
            (300, 1),
            (1, 300),
            (7, 7),
        ];
        for c in configs {
            let p = ImagePreprocessor::new(c.clone());
            for (w, h) in shapes {
                let img = noise(w, h);
                let resized = if c.do_resize {
                    let (nh, nw) = resize_output_size(h, w, c.shortest_edge);
                    resize_bicubic(&img, nw as u32, nh as u32)
                } else {
                    img.clone()
                };
                let want = center_crop(&resized, c.crop_height, c.crop_width);
                let got = p.resize_and_crop(&img).unwrap();
                assert!(got == want, "{w}x{h} with {c:?}");
            }
        }
    }

    /// Thin strips are answered with the crop's work, not the full resize's: 200000x1 would be
    /// resized to 44.8 M x 224 pixels (30 GB) before the crop.
    #[test]
    fn extreme_strips_cost_only_the_crop() {
        let p = ImagePreprocessor::new(ImageConfig::default());
        for (w, h) in [(200_000, 1), (1, 200_000), (16_000, 1), (60_000, 2)] {
            let img = noise(w, h);
            let out = p.preprocess_rgb(&img).unwrap();
            assert_eq!(out.len(), 3 * 224 * 224, "{w}x{h}");
            assert!(out.iter().all(|v| v.is_finite()));
        }
        // Without a crop the resized image is the output, held to the pixel limit.
        let p = ImagePreprocessor::new(ImageConfig {
            do_center_crop: false,
            ..ImageConfig::default()
        });
        let e = p
            .resize_and_crop(&noise(200_000, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("over the limit"), "{e}");
    }

    /// A crop over the pixel limit is reported as the crop, not as the resize (which is within
    /// it: "resized to 224x224 = 50176 pixels, over the limit of 67108864" said nothing true).
    #[test]
    fn pixel_limit_names_the_crop_that_is_over_it() {
        let p = ImagePreprocessor::new(ImageConfig {
            crop_height: 300,
            crop_width: 400,
            ..ImageConfig::default()
        })
        .with_max_pixels(100_000);
        let e = p.resize_and_crop(&noise(20, 20)).unwrap_err().to_string();
        assert!(
            e.contains("400x300 = 120000 pixels (crop_size)") && e.contains("100000"),
            "{e}"
        );
        assert!(!e.contains("224x224"), "{e}");
    }

    /// Only preprocessing that makes `image_size` x `image_size` images fits a tower.
    #[test]
    fn fits_tower_wants_the_tower_image_size() {
        let c = ImageConfig::default();
        assert_eq!(c.fits_tower(224), Ok(()));
        let e = c.fits_tower(336).unwrap_err();
        assert!(
            e.contains("crop_size 224x224") && e.contains("336x336"),
            "{e}"
        );
        let wide = ImageConfig {
            crop_width: 8000,
            ..ImageConfig::default()
        };
        assert!(wide.fits_tower(224).unwrap_err().contains("8000x224"));
        let uncropped = ImageConfig {
            do_center_crop: false,
            shortest_edge: 256,
            ..ImageConfig::default()
        };
        let e = uncropped.fits_tower(224).unwrap_err();
        assert!(e.contains("shortest_edge 256"), "{e}");
        let as_is = ImageConfig {
            do_center_crop: false,
            do_resize: false,
            ..ImageConfig::default()
        };
        assert_eq!(as_is.fits_tower(224), Ok(()));
    }

    /// Without a centre crop only images that resize to the model's shape are accepted, one
    /// by one: an odd one used to pass and then fail the whole batch it was put in.
    #[test]
    fn uncropped_images_of_another_shape_fail_alone() {
        let p = ImagePreprocessor::new(ImageConfig {
            do_center_crop: false,
            ..ImageConfig::default()
        });
        let square = p.preprocess_rgb(&noise(500, 500)).unwrap();
        assert_eq!(square.len(), 3 * 224 * 224);
        let e = p.preprocess_rgb(&noise(600, 400)).unwrap_err().to_string();
        assert!(
            e.contains("(600x400) becomes 336x224") && e.contains("224x224"),
            "{e}"
        );
    }

    #[test]
    fn crop_pads_small_images() {
        let img = RgbImage::from_pixel(3, 3, image::Rgb([9, 9, 9]));
        let out = center_crop(&img, 5, 5);
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(2, 2).0, [9, 9, 9]);
    }

    #[test]
    fn hwc_tensors_equal_decoded_images() {
        let img = RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])
        });
        let p = ImagePreprocessor::new(ImageConfig::default());
        let want = p.preprocess_rgb(&img).unwrap();
        assert_eq!(p.preprocess_hwc_u8(img.as_raw(), 30, 40, 3).unwrap(), want);
        let opaque: Vec<u8> = img.pixels().flat_map(|q| [q[0], q[1], q[2], 255]).collect();
        assert_eq!(p.preprocess_hwc_u8(&opaque, 30, 40, 4).unwrap(), want);
        let grey = RgbImage::from_fn(40, 30, |x, _| image::Rgb([x as u8; 3]));
        let luma: Vec<u8> = (0..30).flat_map(|_| 0..40u8).collect();
        assert_eq!(
            p.preprocess_hwc_u8(&luma, 30, 40, 1).unwrap(),
            p.preprocess_rgb(&grey).unwrap()
        );
    }

    #[test]
    fn alpha_composites_on_white() {
        assert_eq!(on_white(10, 0), 255);
        assert_eq!(on_white(10, 255), 10);
        // Half transparent black over white is mid grey, as Pillow rounds it.
        assert_eq!(on_white(0, 128), 127);
    }

    #[test]
    fn config_forms() {
        let c = ImageConfig::from_json_str(r#"{"size": 336, "crop_size": 336}"#).unwrap();
        assert_eq!((c.shortest_edge, c.crop_height), (336, 336));
        assert!(ImageConfig::from_json_str(r#"{"resample": 2}"#).is_err());
        assert!(ImageConfig::from_json_str(r#"{"image_std": [0, 1, 1]}"#).is_err());
    }

    #[test]
    fn pixel_limit_and_garbage() {
        let p = ImagePreprocessor::new(ImageConfig::default()).with_max_pixels(100);
        let mut png = Vec::new();
        RgbImage::new(20, 20)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let e = p.decode(&png).unwrap_err().to_string();
        assert!(e.contains("over the limit"), "{e}");
        assert!(p.decode(b"definitely not an image").is_err());
        assert!(p.preprocess_hwc_u8(&[0; 10], 2, 2, 3).is_err());
        assert!(p.preprocess_hwc_u8(&[0; 8], 2, 2, 2).is_err());
    }

    /// Only a regular file within the limit is read: a FIFO is refused at once (it used to
    /// block a preprocess thread forever), `/dev/zero` too (it never ends), a file over the
    /// limit before its bytes are read, and a file at the limit is read whole.
    #[test]
    fn read_file_takes_regular_files_within_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.png");
        std::fs::write(&file, vec![7u8; 1000]).expect("write");
        assert_eq!(read_file(&file, 1000).expect("read").len(), 1000);
        let e = read_file(&file, 999).expect_err("over the limit");
        assert!(e.to_string().contains("--max-image-pixels"), "{e}");
        let e = read_file(Path::new("/dev/zero"), 1 << 20).expect_err("a device");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = read_file(dir.path(), 1 << 20).expect_err("a folder");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        #[cfg(unix)]
        {
            let fifo = dir.path().join("fifo.png");
            let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
            // SAFETY: `c` is a NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
            let e = read_file(&fifo, 1 << 20).expect_err("a FIFO");
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        assert!(max_file_bytes(DEFAULT_MAX_PIXELS) > 8 * DEFAULT_MAX_PIXELS);
    }
}
