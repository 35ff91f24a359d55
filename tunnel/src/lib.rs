//! The tunnel header that opens every cross-cluster stream (ARCHITECTURE.md §3.3),
//! shared by the gateway (both ends of QUIC) and the proxy (the client of
//! its local gateway's egress).
//!
//! - [`frame`]: length-prefixed `TunnelOpen` / `TunnelAccept` frames and
//!   the checks a `TunnelOpen` must pass. I/O-free.
//! - [`io`]: reading and writing exactly one frame on an async stream.

#![forbid(unsafe_code)]

pub mod frame;
pub mod io;

pub use frame::{FrameError, OpenRequest, Refusal};
pub use io::{ReadFrameError, read_frame, write_frame};
