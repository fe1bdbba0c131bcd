//! Hugging Face `config.json` -> typed CLIP configuration.
//!
//! Accepts the three shapes a CLIP checkpoint comes in: a full `CLIPConfig` (`text_config` and
//! `vision_config` nested), a `CLIPTextModelWithProjection` config (`model_type: clip_text_model`)
//! and a `CLIPVisionModelWithProjection` config (`model_type: clip_vision_model`). Missing fields
//! take transformers' defaults, because older hub configs omit everything that equals a default.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// The non-linearity inside the MLP blocks. OpenAI's checkpoints use `quick_gelu`; LAION ones `gelu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh")]
    Gelu,
}

fn default_quick_gelu() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

/// Shape of the text tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default = "TextConfig::d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "TextConfig::d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "TextConfig::d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "TextConfig::d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "TextConfig::d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "TextConfig::d_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `2` in the original OpenAI configs, which makes transformers pool at the arg-max token id
    /// (the end-of-text token has the largest id); any other value pools at the first token equal
    /// to it.
    #[serde(default = "TextConfig::d_eos")]
    pub eos_token_id: u32,
    /// Only present in standalone text-model configs; the full config keeps it at the top level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_dim: Option<usize>,
}

impl TextConfig {
    fn d_vocab() -> usize {
        49408
    }
    fn d_hidden() -> usize {
        512
    }
    fn d_inter() -> usize {
        2048
    }
    fn d_layers() -> usize {
        12
    }
    fn d_heads() -> usize {
        8
    }
    fn d_pos() -> usize {
        77
    }
    fn d_eos() -> u32 {
        2
    }
}

/// Shape of the vision tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "VisionConfig::d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "VisionConfig::d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "VisionConfig::d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "VisionConfig::d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "VisionConfig::d_channels")]
    pub num_channels: usize,
    #[serde(default = "VisionConfig::d_image")]
    pub image_size: usize,
    #[serde(default = "VisionConfig::d_patch")]
    pub patch_size: usize,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_dim: Option<usize>,
}

impl VisionConfig {
    fn d_hidden() -> usize {
        768
    }
    fn d_inter() -> usize {
        3072
    }
    fn d_layers() -> usize {
        12
    }
    fn d_heads() -> usize {
        12
    }
    fn d_channels() -> usize {
        3
    }
    fn d_image() -> usize {
        224
    }
    fn d_patch() -> usize {
        32
    }

    /// Patches per side; the sequence is this squared plus the class token.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Floating-point operations of one image's forward pass to its projected features: the
    /// patch product, every block over every token, the projection (2 per multiply-add;
    /// norms, softmax and activations not counted, as model-FLOP utilisation counts them).
    pub fn forward_flops(&self, projection_dim: usize) -> f64 {
        let (g, p, d) = (
            self.grid() as f64,
            self.patch_size as f64,
            self.hidden_size as f64,
        );
        let patches = 2.0 * g * g * (self.num_channels as f64 * p * p) * d;
        let blocks = encoder_flops(
            g * g + 1.0,
            d,
            self.intermediate_size as f64,
            self.num_hidden_layers,
        );
        patches + blocks + 2.0 * d * projection_dim as f64
    }
}

impl TextConfig {
    /// Floating-point operations of one caption's forward pass over `tokens` tokens (up to its
    /// end-of-text token) to its projected features, counted as [`VisionConfig::forward_flops`].
    pub fn forward_flops(&self, tokens: usize, projection_dim: usize) -> f64 {
        let d = self.hidden_size as f64;
        let blocks = encoder_flops(
            tokens as f64,
            d,
            self.intermediate_size as f64,
            self.num_hidden_layers,
        );
        blocks + 2.0 * d * projection_dim as f64
    }
}

/// `layers` pre-LN blocks over `n` tokens of width `d` with an MLP of `inter`: the four
/// attention projections and two MLP products per token, and the two attention products.
fn encoder_flops(n: f64, d: f64, inter: f64, layers: usize) -> f64 {
    layers as f64 * (2.0 * n * (4.0 * d * d + 2.0 * d * inter) + 4.0 * n * n * d)
}

/// A whole CLIP configuration. Either tower may be absent when the file describes one tower only.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub text: Option<TextConfig>,
    pub vision: Option<VisionConfig>,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
    /// The file as read, so that artifacts can write back exactly what users gave us.
    pub raw: serde_json::Value,
}

#[derive(Deserialize)]
struct RawFull {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    text_config: Option<TextConfig>,
    #[serde(default)]
    vision_config: Option<VisionConfig>,
    #[serde(default)]
    projection_dim: Option<usize>,
    #[serde(default)]
    logit_scale_init_value: Option<f64>,
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config { msg, .. } => ModelError::Config {
                path: path.into(),
                msg,
            },
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        let bad = |msg: String| ModelError::Config {
            path: "<config.json>".into(),
            msg,
        };
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let full: RawFull = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        let model_type = full.model_type.as_deref().unwrap_or("clip");
        let (text_cfg, vision_cfg) = match model_type {
            "clip_text_model" => {
                let t: TextConfig =
                    serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
                (Some(t), None)
            }
            "clip_vision_model" => {
                let v: VisionConfig =
                    serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
                (None, Some(v))
            }
            "clip" => (
                Some(full.text_config.unwrap_or_else(|| {
                    serde_json::from_value(serde_json::json!({})).expect("defaults deserialize")
                })),
                Some(full.vision_config.unwrap_or_else(|| {
                    serde_json::from_value(serde_json::json!({})).expect("defaults deserialize")
                })),
            ),
            other => return Err(bad(format!("model_type {other:?} is not a CLIP model"))),
        };
        let projection_dim = full
            .projection_dim
            .or_else(|| text_cfg.as_ref().and_then(|t| t.projection_dim))
            .or_else(|| vision_cfg.as_ref().and_then(|v| v.projection_dim))
            .unwrap_or(512);
        let cfg = ClipConfig {
            text: text_cfg,
            vision: vision_cfg,
            projection_dim,
            logit_scale_init_value: full.logit_scale_init_value.unwrap_or(2.6592),
            raw,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.text {
            if t.num_attention_heads == 0 || t.hidden_size % t.num_attention_heads != 0 {
                return Err(format!(
                    "text hidden_size {} is not divisible by num_attention_heads {}",
                    t.hidden_size, t.num_attention_heads
                ));
            }
            if t.max_position_embeddings < 2 {
                return Err("text max_position_embeddings must be at least 2".into());
            }
        }
        if let Some(v) = &self.vision {
            if v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads != 0 {
                return Err(format!(
                    "vision hidden_size {} is not divisible by num_attention_heads {}",
                    v.hidden_size, v.num_attention_heads
                ));
            }
            if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
                return Err(format!(
                    "vision image_size {} is not a multiple of patch_size {}",
                    v.image_size, v.patch_size
                ));
            }
        }
        if self.projection_dim == 0 {
            return Err("projection_dim must be positive".into());
        }
        Ok(())
    }

    /// The embedding width both towers project into.
    pub fn output_dim(&self) -> usize {
        self.projection_dim
    }
}

/// Which towers to build. Serving one tower reads none of the other's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Towers {
    pub text: bool,
    pub vision: bool,
}

impl Towers {
    pub const ALL: Towers = Towers {
        text: true,
        vision: true,
    };
    pub const TEXT: Towers = Towers {
        text: true,
        vision: false,
    };
    pub const VISION: Towers = Towers {
        text: false,
        vision: true,
    };

    /// Parses Finetuner's submodel names: `clip-text`, `clip-vision`, or `all`.
    pub fn from_select(s: &str) -> Option<Self> {
        match s {
            "clip-text" | "text" => Some(Self::TEXT),
            "clip-vision" | "vision" => Some(Self::VISION),
            "all" | "both" => Some(Self::ALL),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ViT-B/32's known costs: 4.4 G multiply-adds per image, 2.98 G per 77-token caption.
    #[test]
    fn forward_flops_of_vit_b_32() {
        let c = ClipConfig::from_json_str("{}").unwrap();
        let (t, v) = (c.text.unwrap(), c.vision.unwrap());
        let image = v.forward_flops(c.projection_dim);
        let text = t.forward_flops(77, c.projection_dim);
        assert!((image / 1e9 - 8.818).abs() < 0.01, "{image}");
        assert!((text / 1e9 - 5.960).abs() < 0.01, "{text}");
        // Attention grows with the square of the tokens, the rest linearly.
        assert!(t.forward_flops(20, 512) < text * 20.0 / 77.0);
    }

    #[test]
    fn empty_full_config_is_vit_b_32() {
        let c = ClipConfig::from_json_str("{}").unwrap();
        let t = c.text.unwrap();
        let v = c.vision.unwrap();
        assert_eq!(
            (t.hidden_size, t.num_hidden_layers, t.num_attention_heads),
            (512, 12, 8)
        );
        assert_eq!((v.hidden_size, v.patch_size, v.image_size), (768, 32, 224));
        assert_eq!(c.projection_dim, 512);
    }

    #[test]
    fn standalone_text_config() {
        let c = ClipConfig::from_json_str(
            r#"{"model_type":"clip_text_model","hidden_size":64,"num_attention_heads":4,"projection_dim":32}"#,
        )
        .unwrap();
        assert!(c.vision.is_none());
        assert_eq!(c.text.unwrap().hidden_size, 64);
        assert_eq!(c.projection_dim, 32);
    }

    #[test]
    fn rejects_bad_heads_and_foreign_models() {
        let e = ClipConfig::from_json_str(
            r#"{"text_config":{"hidden_size":30,"num_attention_heads":4}}"#,
        );
        assert!(e.unwrap_err().to_string().contains("divisible"));
        let e = ClipConfig::from_json_str(r#"{"model_type":"bert"}"#);
        assert!(e.unwrap_err().to_string().contains("not a CLIP model"));
    }

    #[test]
    fn activations() {
        let c = ClipConfig::from_json_str(r#"{"text_config":{"hidden_act":"gelu"}}"#).unwrap();
        assert_eq!(c.text.unwrap().hidden_act, Activation::Gelu);
        assert!(ClipConfig::from_json_str(r#"{"text_config":{"hidden_act":"relu"}}"#).is_err());
    }
}
