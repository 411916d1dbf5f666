//! The node API's wire (see `vessel_types::api` for the message types): frames, file
//! descriptor passing, and the blocking client the CLI uses.

pub mod client;
pub mod fdpass;
pub mod frame;

pub use client::Client;
pub use frame::{read_frame, write_frame, FrameError};
