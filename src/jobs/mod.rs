//! jobs layer (to be written).
