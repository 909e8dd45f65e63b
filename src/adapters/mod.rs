//! Adapters chosen per request on top of a loaded model: the LoRA family (kohya / A1111,
//! diffusers / peft, LoCon, LoHa, LoKr), applied without reloading the base weights.

pub mod lora;
