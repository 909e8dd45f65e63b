//! Image encoding and decoding (to be written).
