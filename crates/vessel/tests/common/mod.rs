//! Shared by the integration tests: the testkit harness on this package's binary.

#![allow(dead_code)]

pub mod repl;

pub use vessel_testkit::*;

pub fn vessel_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_vessel"))
}

pub fn start(tag: &str) -> TestNode {
    TestNode::start(&vessel_bin(), tag)
}
