//! CLIP tokenizer (being written on the tokenizer branch; this placeholder only fixes the API).

use std::path::Path;

use crate::error::ModelError;

pub struct ClipTokenizer;

impl ClipTokenizer {
    pub fn from_folder(dir: &Path) -> Result<Self, ModelError> {
        let _ = dir;
        todo!()
    }
    pub fn bundled(pad_token: &str) -> Result<Self, ModelError> {
        let _ = pad_token;
        todo!()
    }
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>, ModelError> {
        let _ = (text, max_len);
        todo!()
    }
}
