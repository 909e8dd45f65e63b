//! Helpers shared by integration tests.

pub mod shapes_judge;
