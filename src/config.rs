//! Typed settings (to be written).
