//! The tunnel that carries every cross-cluster stream (ARCHITECTURE.md
//! §3.3), shared by the gateway (both ends of QUIC) and the proxy:
//!
//! - [`frame`]: length-prefixed `TunnelOpen` / `TunnelAccept` frames and
//!   the checks a `TunnelOpen` must pass. I/O-free.
//! - [`io`]: reading and writing exactly one frame on an async stream.
//! - [`quic`]: QUIC with mutual TLS (SVIDs), the UDP socket, stream codes.
//! - [`peers`]: other clusters' trust domains and gateways.
//! - [`splice`]: a TCP stream and a QUIC stream, both ways until both end.
//! - [`pool`]: the QUIC client: one pooled connection per remote gateway,
//!   the next gateway on a refusal or a failure; with [`backoff`]
//!   (I/O-free) and [`dns`] (gateways given by name).

#![forbid(unsafe_code)]

pub mod backoff;
pub mod dns;
pub mod frame;
pub mod io;
pub mod peers;
pub mod pool;
pub mod quic;
pub mod splice;

pub use frame::{FrameError, OpenRequest, Refusal};
pub use io::{ReadFrameError, read_frame, write_frame};
