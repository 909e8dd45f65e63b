//! workers layer (to be written).
