//! Adapters chosen per request on top of a loaded model: textual-inversion embeddings and
//! the LoRA family (kohya / A1111, diffusers / peft, LoCon, LoHa, LoKr), applied without
//! reloading the base weights, ControlNets, T2I-Adapters and IP-Adapters (image prompts). They are read from the
//! configured directories only; `directory` holds what the libraries share about those
//! directories (name checks, confined lookup, listing, the loaded-model cache).

pub mod controlnet;
pub mod directory;
pub mod embeddings;
pub mod ip_adapter;
pub mod lora;
pub mod t2i;
