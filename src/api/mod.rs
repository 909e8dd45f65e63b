//! api layer (to be written).
