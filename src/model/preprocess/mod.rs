//! Raw inputs to tower inputs: [`tokenizer`] (CLIP BPE, 77 tokens, padding to the longest) and
//! [`image`] (decode, Pillow-exact bicubic resize of the window the centre crop keeps,
//! normalise).

pub mod image;
pub mod tokenizer;
