//! The `sdserve` command line: serve | generate | print-openapi.
fn main() {}
