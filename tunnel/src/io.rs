//! Reading and writing one header frame. Only the frame: whatever follows
//! it belongs to the application and stays in the stream.

use std::io;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, FrameError, PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream ended before a complete header")]
    Eof,
    #[error("reading the header: {0}")]
    Io(io::Error),
}

/// Reads exactly one frame, and not a byte more.
pub async fn read_frame<M: Message + Default>(
    what: &'static str,
    r: &mut (impl AsyncRead + Unpin),
) -> Result<M, ReadFrameError> {
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => ReadFrameError::Eof,
        _ => ReadFrameError::Io(e),
    };
    let mut prefix = [0u8; PREFIX];
    r.read_exact(&mut prefix).await.map_err(io)?;
    let mut body = vec![0u8; frame::body_len(prefix)?];
    r.read_exact(&mut body).await.map_err(io)?;
    Ok(frame::decode_body(what, &body)?)
}

/// Writes one frame and flushes it.
pub async fn write_frame(w: &mut (impl AsyncWrite + Unpin), msg: &impl Message) -> io::Result<()> {
    let bytes = frame::encode(msg).map_err(io::Error::other)?;
    w.write_all(&bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_proto::tunnel::v1::TunnelAccept;

    #[tokio::test]
    async fn reads_one_frame_and_leaves_what_follows() {
        let accept = crate::frame::accept_ok("10.0.0.1:80".into());
        let mut wire = Vec::new();
        write_frame(&mut wire, &accept).await.unwrap();
        wire.extend_from_slice(b"app bytes");
        let mut r = &wire[..];
        let got: TunnelAccept = read_frame("TunnelAccept", &mut r).await.unwrap();
        assert_eq!(got, accept);
        assert_eq!(r, b"app bytes");
    }

    #[tokio::test]
    async fn a_short_stream_is_eof_and_an_oversized_prefix_is_refused_unread() {
        let mut r: &[u8] = &[0, 0, 0, 9, 1];
        let e = read_frame::<TunnelAccept>("TunnelAccept", &mut r).await;
        assert!(matches!(e, Err(ReadFrameError::Eof)), "{e:?}");
        let mut r: &[u8] = &[0, 1, 0, 1];
        let e = read_frame::<TunnelAccept>("TunnelAccept", &mut r).await;
        assert!(
            matches!(e, Err(ReadFrameError::Frame(FrameError::TooLong(65537)))),
            "{e:?}"
        );
    }
}
