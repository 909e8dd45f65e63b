//! Adapters chosen per request on top of a loaded model: textual-inversion embeddings
//! (and LoRA-family weights). They are read from the configured directories only.

pub mod embeddings;
