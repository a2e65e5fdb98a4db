//! Makes gRPC clients that send an invalid `:authority` over a Unix socket work.
//!
//! gRPC C-core (py-spiffe, and every grpcio-based client) sets `:authority` to the
//! percent-encoded socket path for `unix:` targets (grpc/grpc#38142), and grpc-java sends
//! the raw path. The HTTP/2 stack under tonic (h2) rejects such a request with
//! RST_STREAM(PROTOCOL_ERROR) before any application code sees it (hyperium/h2#487), so
//! py-spiffe cannot talk to a tonic server on a socket.
//!
//! [`AuthorityFix`] sits between the socket and the HTTP/2 server on the read side. It
//! passes the connection preface and every frame through unchanged, except header blocks
//! (HEADERS + CONTINUATION): those are HPACK-decoded with the client's compression
//! context, an `:authority` that is not a valid URI authority is replaced by `localhost`
//! (what grpc-go and Kubernetes use for Unix sockets), and the block is re-encoded with a
//! compression context of our own that mirrors the server's decoder. Because every block
//! is re-encoded, the server never sees the client's dynamic table. The write side is
//! untouched.
//!
//! Bounds (what a connection can make the agent hold is what h2 headers need, not what a
//! client announces):
//! - a frame whose header announces more than [`MAX_FRAME`] (the server's
//!   SETTINGS_MAX_FRAME_SIZE) ends the connection at its 9-byte header, before any of its
//!   payload is buffered;
//! - a header block may grow to [`MAX_HEADER_BLOCK`] and decode to [`MAX_DECODED`];
//! - request bytes of streams the client has not finished (no END_STREAM yet) may add up
//!   to [`MAX_OPEN_REQUEST_BYTES`] on one connection: the server buffers a request until
//!   its message is whole, so a client that starts many large requests and stalls them
//!   would otherwise pin that memory until their deadline. On the long-lived request
//!   streams of [`STREAMING_PATHS`] (Envoy's SDS, where a proxy sends a request per
//!   response for days), only the bytes of the gRPC message in transit count: a whole
//!   message has been handed to the server, which reads them as they come; what it has
//!   not read yet is bounded by the HTTP/2 receive window the server advertises
//!   ([`CONNECTION_WINDOW`]).
//!
//! Nothing else about the request is changed.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest frame payload. The server advertises SETTINGS_MAX_FRAME_SIZE 16 KiB (the
/// protocol's default, set explicitly by the Workload API server), so a conforming client
/// never sends more, and a larger frame is refused at its header.
pub const MAX_FRAME: usize = 16 * 1024;
/// Largest reassembled (compressed) header block.
pub const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// Largest decoded header list (names + values), against HPACK "bombs" where a few bytes
/// of indexed references expand to megabytes. gRPC requests carry well under 1 KiB; the
/// server's SETTINGS_MAX_HEADER_LIST_SIZE is this too.
pub const MAX_DECODED: usize = 16 * 1024;
/// Most request bytes of unfinished streams on one connection: one largest Workload API
/// request (64 KiB) in transit, plus room for small ones.
pub const MAX_OPEN_REQUEST_BYTES: usize = 80 * 1024;
/// Request streams that stay open while their client sends message after message: a
/// message that is whole no longer counts against [`MAX_OPEN_REQUEST_BYTES`].
pub const STREAMING_PATHS: &[&[u8]] =
    &[b"/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"];
/// The HTTP/2 receive window the server advertises for a connection: request bytes a
/// client may send that the server has not read yet (above [`MAX_OPEN_REQUEST_BYTES`], so
/// that bound is reached first on other streams).
pub const CONNECTION_WINDOW: u32 = 128 * 1024;
/// Frame size used for re-encoded header blocks (HTTP/2's default and minimum maximum).
const OUT_FRAME: usize = 16_384;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a client's byte stream was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FixError {
    /// A frame or header block over the bounds.
    #[error("HTTP/2 frame or header block too large ({0} bytes)")]
    TooLarge(usize),
    /// Malformed framing (padding, missing CONTINUATION).
    #[error("malformed HTTP/2 framing: {0}")]
    Framing(&'static str),
    /// The header block does not decode.
    #[error("header block does not decode (HPACK): {0}")]
    Hpack(String),
}

/// The read-side rewriter, independent of I/O (fed bytes, yields bytes).
pub struct Rewriter {
    input: Vec<u8>,
    preface_left: usize,
    /// Header block being reassembled: (stream id, flags of the HEADERS frame, priority
    /// bytes, fragments so far).
    pending: Option<(u32, u8, Vec<u8>, Vec<u8>)>,
    decoder: hpack::Decoder<'static>,
    encoder: hpack::Encoder<'static>,
    /// Request bytes received on streams without END_STREAM yet, by stream.
    open_requests: std::collections::HashMap<u32, usize>,
    /// Their sum.
    open_request_bytes: usize,
    /// gRPC message framing of the open [`STREAMING_PATHS`] streams.
    framed: std::collections::HashMap<u32, Framing>,
    /// Requests whose `:authority` was replaced.
    pub rewritten: u64,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("buffered", &self.input.len())
            .field("rewritten", &self.rewritten)
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        Self {
            input: Vec::new(),
            preface_left: PREFACE.len(),
            pending: None,
            decoder: hpack::Decoder::new(),
            encoder: hpack::Encoder::new(),
            open_requests: std::collections::HashMap::new(),
            open_request_bytes: 0,
            framed: std::collections::HashMap::new(),
            rewritten: 0,
        }
    }
}

/// Where a stream is in its gRPC length-prefixed messages (a flag byte, a 4-byte length,
/// the message).
#[derive(Debug, Default)]
struct Framing {
    /// Prefix bytes of the message in transit (up to 5).
    head: Vec<u8>,
    /// Message bytes still to come once the prefix is whole.
    left: usize,
    /// Bytes of the message in transit so far, its prefix included.
    current: usize,
}

impl Framing {
    /// Takes a DATA frame's data; returns the bytes of the message still in transit.
    fn feed(&mut self, mut data: &[u8]) -> usize {
        while !data.is_empty() {
            if self.head.len() < 5 {
                let n = (5 - self.head.len()).min(data.len());
                self.head.extend_from_slice(&data[..n]);
                self.current += n;
                data = &data[n..];
                if self.head.len() == 5 {
                    self.left = u32::from_be_bytes([
                        self.head[1],
                        self.head[2],
                        self.head[3],
                        self.head[4],
                    ]) as usize;
                }
            } else {
                let n = self.left.min(data.len());
                self.left -= n;
                self.current += n;
                data = &data[n..];
            }
            if self.head.len() == 5 && self.left == 0 {
                *self = Framing::default();
            }
        }
        self.current
    }
}

fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

impl Rewriter {
    /// Bytes held back until a frame is complete.
    pub fn buffered(&self) -> usize {
        self.input.len() + self.pending.as_ref().map_or(0, |p| p.3.len())
    }

    /// Feeds bytes read from the client; appends what the server should read to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), FixError> {
        self.input.extend_from_slice(bytes);
        let mut pos = 0;
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.input.len());
            out.extend_from_slice(&self.input[..n]);
            self.preface_left -= n;
            pos = n;
        }
        loop {
            let rest = &self.input[pos..];
            if rest.len() < 9 {
                break;
            }
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            if len > MAX_FRAME {
                return Err(FixError::TooLarge(len));
            }
            if rest.len() < 9 + len {
                break;
            }
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
            let payload = rest[9..9 + len].to_vec();
            let header = rest[..9].to_vec();
            pos += 9 + len;
            match kind {
                HEADERS => {
                    if self.pending.is_some() {
                        return Err(FixError::Framing("HEADERS while a header block is open"));
                    }
                    let mut body = &payload[..];
                    let mut pad = 0;
                    if flags & PADDED != 0 {
                        pad = usize::from(
                            *body
                                .first()
                                .ok_or(FixError::Framing("padding length missing"))?,
                        );
                        body = &body[1..];
                    }
                    let mut priority = Vec::new();
                    if flags & PRIORITY != 0 {
                        if body.len() < 5 {
                            return Err(FixError::Framing("priority fields missing"));
                        }
                        priority = body[..5].to_vec();
                        body = &body[5..];
                    }
                    if pad > body.len() {
                        return Err(FixError::Framing("padding longer than the frame"));
                    }
                    let fragment = body[..body.len() - pad].to_vec();
                    if flags & END_STREAM != 0 {
                        self.track_request(stream, 0, true)?;
                    }
                    self.pending = Some((stream, flags, priority, fragment));
                    if flags & END_HEADERS != 0 {
                        self.finish_block(out)?;
                    }
                }
                CONTINUATION => {
                    let Some((open, ..)) = &mut self.pending else {
                        return Err(FixError::Framing("CONTINUATION without HEADERS"));
                    };
                    if *open != stream {
                        return Err(FixError::Framing("CONTINUATION on another stream"));
                    }
                    if let Some((.., fragments)) = &mut self.pending {
                        fragments.extend_from_slice(&payload);
                        if fragments.len() > MAX_HEADER_BLOCK {
                            return Err(FixError::TooLarge(fragments.len()));
                        }
                    }
                    if flags & END_HEADERS != 0 {
                        self.finish_block(out)?;
                    }
                }
                _ => {
                    if self.pending.is_some() {
                        return Err(FixError::Framing(
                            "a header block must be followed by CONTINUATION",
                        ));
                    }
                    if kind == DATA && stream != 0 && self.framed.contains_key(&stream) {
                        self.track_framed(stream, flags, &payload)?;
                    } else if kind == DATA && stream != 0 {
                        self.track_request(stream, len, flags & END_STREAM != 0)?;
                    } else if kind == RST_STREAM {
                        self.track_request(stream, 0, true)?;
                    }
                    out.extend_from_slice(&header);
                    out.extend_from_slice(&payload);
                }
            }
        }
        self.input.drain(..pos);
        Ok(())
    }

    /// A DATA frame of a [`STREAMING_PATHS`] stream: only the message in transit counts.
    fn track_framed(&mut self, stream: u32, flags: u8, payload: &[u8]) -> Result<(), FixError> {
        let mut data = payload;
        if flags & PADDED != 0 {
            let pad = usize::from(
                *data
                    .first()
                    .ok_or(FixError::Framing("padding length missing"))?,
            );
            data = &data[1..];
            if pad > data.len() {
                return Err(FixError::Framing("padding longer than the frame"));
            }
            data = &data[..data.len() - pad];
        }
        let current = self.framed.entry(stream).or_default().feed(data);
        let before = self.open_requests.remove(&stream).unwrap_or(0);
        self.open_request_bytes -= before;
        if flags & END_STREAM != 0 {
            self.framed.remove(&stream);
            return Ok(());
        }
        self.open_request_bytes += current;
        self.open_requests.insert(stream, current);
        if self.open_request_bytes > MAX_OPEN_REQUEST_BYTES {
            return Err(FixError::TooLarge(self.open_request_bytes));
        }
        Ok(())
    }

    /// Counts `len` request bytes on `stream`; `ended` forgets the stream.
    fn track_request(&mut self, stream: u32, len: usize, ended: bool) -> Result<(), FixError> {
        let before = self.open_requests.remove(&stream).unwrap_or(0);
        if ended {
            self.open_request_bytes -= before;
            self.framed.remove(&stream);
            return Ok(());
        }
        self.open_request_bytes += len;
        self.open_requests.insert(stream, before + len);
        if self.open_request_bytes > MAX_OPEN_REQUEST_BYTES {
            return Err(FixError::TooLarge(self.open_request_bytes));
        }
        Ok(())
    }

    fn finish_block(&mut self, out: &mut Vec<u8>) -> Result<(), FixError> {
        let Some((stream, flags, priority, block)) = self.pending.take() else {
            return Ok(());
        };
        check_block(&block)?;
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut decoded = 0usize;
        self.decoder
            .decode_with_cb(&block, |n, v| {
                decoded += n.len() + v.len();
                if decoded <= MAX_DECODED {
                    headers.push((n.into_owned(), v.into_owned()));
                }
            })
            .map_err(|e| FixError::Hpack(format!("{e:?}")))?;
        if decoded > MAX_DECODED {
            return Err(FixError::TooLarge(decoded));
        }
        if headers
            .iter()
            .any(|(n, v)| n.as_slice() == b":path" && STREAMING_PATHS.contains(&v.as_slice()))
        {
            self.framed.entry(stream).or_default();
        }
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority" && !valid_authority(value) {
                *value = b"localhost".to_vec();
                self.rewritten += 1;
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        if encoded.len() > MAX_HEADER_BLOCK {
            return Err(FixError::TooLarge(encoded.len()));
        }
        // HEADERS (priority kept, padding dropped), then CONTINUATIONs as needed.
        let first_room = OUT_FRAME - priority.len();
        let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
        let mut first_flags = flags & (END_STREAM | PRIORITY);
        if rest.is_empty() {
            first_flags |= END_HEADERS;
        }
        let mut payload = priority;
        payload.extend_from_slice(first);
        frame(out, HEADERS, first_flags, stream, &payload);
        while !rest.is_empty() {
            let (chunk, more) = rest.split_at(rest.len().min(OUT_FRAME));
            frame(
                out,
                CONTINUATION,
                if more.is_empty() { END_HEADERS } else { 0 },
                stream,
                chunk,
            );
            rest = more;
        }
        Ok(())
    }
}

/// The largest dynamic table a client may ask for: the server's
/// SETTINGS_HEADER_TABLE_SIZE, which h2 leaves at the protocol default.
const MAX_TABLE_SIZE: usize = 4096;

/// Walks a header block's representations (RFC 7541 section 6) without decoding them:
/// every integer and string length must be well formed and inside the block, and a
/// dynamic table size update may not exceed [`MAX_TABLE_SIZE`]. The HPACK decoder then
/// never meets input it would panic on (hpack 0.3 unwraps a truncated size update, found
/// by the fuzz target) or a table size the server never allowed.
fn check_block(block: &[u8]) -> Result<(), FixError> {
    fn int(block: &[u8], i: &mut usize, prefix: u8) -> Result<usize, FixError> {
        let bad = || FixError::Hpack("malformed integer".into());
        let first = *block.get(*i).ok_or_else(bad)?;
        *i += 1;
        let mask = (1u16 << prefix) as usize - 1;
        let mut value = usize::from(first) & mask;
        if value < mask {
            return Ok(value);
        }
        for shift in (0..35).step_by(7) {
            let b = *block.get(*i).ok_or_else(bad)?;
            *i += 1;
            value = value
                .checked_add(usize::from(b & 0x7f) << shift)
                .ok_or_else(bad)?;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad())
    }
    fn string(block: &[u8], i: &mut usize) -> Result<(), FixError> {
        let len = int(block, i, 7)?;
        *i = i
            .checked_add(len)
            .filter(|end| *end <= block.len())
            .ok_or_else(|| FixError::Hpack("string literal runs past the block".into()))?;
        Ok(())
    }
    let mut i = 0;
    while i < block.len() {
        let b = block[i];
        if b & 0x80 != 0 {
            int(block, &mut i, 7)?;
        } else if b & 0xc0 == 0x40 {
            if int(block, &mut i, 6)? == 0 {
                string(block, &mut i)?;
            }
            string(block, &mut i)?;
        } else if b & 0xe0 == 0x20 {
            let size = int(block, &mut i, 5)?;
            if size > MAX_TABLE_SIZE {
                return Err(FixError::Hpack(format!(
                    "dynamic table size update to {size} exceeds {MAX_TABLE_SIZE}"
                )));
            }
        } else {
            if int(block, &mut i, 4)? == 0 {
                string(block, &mut i)?;
            }
            string(block, &mut i)?;
        }
    }
    Ok(())
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// A connection whose client-to-server bytes go through a [`Rewriter`].
#[derive(Debug)]
pub struct AuthorityFix<S> {
    io: S,
    rewriter: Rewriter,
    ready: Vec<u8>,
    offset: usize,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(io: S) -> Self {
        Self {
            io,
            rewriter: Rewriter::default(),
            ready: Vec::new(),
            offset: 0,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.offset < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.offset);
                buf.put_slice(&this.ready[this.offset..this.offset + n]);
                this.offset += n;
                if this.offset == this.ready.len() {
                    this.ready.clear();
                    this.offset = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut raw);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let got = rb.filled();
            if got.is_empty() {
                return Poll::Ready(Ok(())); // EOF
            }
            this.rewriter
                .feed(got, &mut this.ready)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn block(enc: &mut hpack::Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (&b":scheme"[..], &b"http"[..]),
            (&b":path"[..], &b"/SpiffeWorkloadAPI/FetchX509SVID"[..]),
            (&b":authority"[..], authority),
            (&b"workload.spiffe.io"[..], &b"true"[..]),
        ])
    }

    fn decode_all(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut dec = hpack::Decoder::new();
        let mut pos = PREFACE.len();
        let mut blocks = Vec::new();
        let mut pending = Vec::new();
        while pos + 9 <= bytes.len() {
            let len = (usize::from(bytes[pos]) << 16)
                | (usize::from(bytes[pos + 1]) << 8)
                | usize::from(bytes[pos + 2]);
            let (kind, flags) = (bytes[pos + 3], bytes[pos + 4]);
            let payload = &bytes[pos + 9..pos + 9 + len];
            if kind == HEADERS || kind == CONTINUATION {
                let skip = if kind == HEADERS && flags & PRIORITY != 0 {
                    5
                } else {
                    0
                };
                pending.extend_from_slice(&payload[skip..]);
                if flags & END_HEADERS != 0 {
                    blocks.push(dec.decode(&pending).unwrap());
                    pending.clear();
                }
            }
            pos += 9 + len;
        }
        blocks
    }

    #[test]
    fn percent_encoded_authority_becomes_localhost_and_the_rest_is_untouched() {
        let mut enc = hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        frame(&mut input, 0x4, 0, 0, &[]); // SETTINGS
        frame(
            &mut input,
            HEADERS,
            END_HEADERS,
            1,
            &block(&mut enc, b"%2Frun%2Fsigil%2Fapi.sock"),
        );
        frame(&mut input, 0x0, END_STREAM, 1, b"\0\0\0\0\0"); // DATA
        // The client's dynamic table now holds the bad authority; a second request refers
        // to it by index and must be fixed too.
        frame(
            &mut input,
            HEADERS,
            END_HEADERS,
            3,
            &block(&mut enc, b"%2Frun%2Fsigil%2Fapi.sock"),
        );
        let mut rw = Rewriter::default();
        let mut out = Vec::new();
        // Byte by byte, to exercise reassembly.
        for b in &input {
            rw.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(rw.rewritten, 2);
        assert!(out.starts_with(PREFACE));
        let blocks = decode_all(&out);
        assert_eq!(blocks.len(), 2);
        for b in blocks {
            let authority = b.iter().find(|(n, _)| n == b":authority").unwrap();
            assert_eq!(authority.1, b"localhost");
            assert!(
                b.iter()
                    .any(|(n, v)| n == b"workload.spiffe.io" && v == b"true")
            );
        }
        // The DATA frame passed through byte for byte.
        assert!(out.windows(5).any(|w| w == b"\0\0\0\0\0"));
    }

    #[test]
    fn valid_authorities_are_kept_and_continuations_reassembled() {
        let mut enc = hpack::Encoder::new();
        let b = block(&mut enc, b"localhost:1234");
        let (a, rest) = b.split_at(10);
        let mut input = PREFACE.to_vec();
        frame(&mut input, HEADERS, END_STREAM, 1, a);
        frame(&mut input, CONTINUATION, END_HEADERS, 1, rest);
        let mut rw = Rewriter::default();
        let mut out = Vec::new();
        rw.feed(&input, &mut out).unwrap();
        assert_eq!(rw.rewritten, 0);
        let blocks = decode_all(&out);
        assert_eq!(
            blocks[0]
                .iter()
                .find(|(n, _)| n == b":authority")
                .unwrap()
                .1,
            b"localhost:1234"
        );
    }

    #[test]
    fn an_hpack_bomb_is_refused() {
        // One 4000-byte header enters the dynamic table; 100 one-byte references to it
        // would decode to 400 KB.
        let mut enc = hpack::Encoder::new();
        let big = vec![b'a'; 4000];
        let mut block = enc.encode(vec![(&b"x-big"[..], &big[..])]);
        let reference = enc.encode(vec![(&b"x-big"[..], &big[..])]);
        assert_eq!(
            reference.len(),
            1,
            "the second occurrence is one indexed byte"
        );
        for _ in 0..100 {
            block.extend_from_slice(&reference);
        }
        let mut input = PREFACE.to_vec();
        frame(&mut input, HEADERS, END_HEADERS, 1, &block);
        let mut rw = Rewriter::default();
        let r = rw.feed(&input, &mut Vec::new());
        assert!(
            matches!(r, Err(FixError::TooLarge(n)) if n > MAX_DECODED),
            "{r:?}"
        );
    }

    #[test]
    fn malformed_or_oversized_table_size_updates_are_refused() {
        let mut input = PREFACE.to_vec();
        frame(&mut input, HEADERS, END_HEADERS, 1, &[0x3f]); // size update, integer cut short
        assert!(matches!(
            Rewriter::default().feed(&input, &mut Vec::new()),
            Err(FixError::Hpack(_))
        ));
        let mut input = PREFACE.to_vec();
        frame(
            &mut input,
            HEADERS,
            END_HEADERS,
            1,
            &[0x3f, 0xe1, 0xff, 0x03],
        ); // size update to 65536
        let r = Rewriter::default().feed(&input, &mut Vec::new());
        assert!(
            matches!(&r, Err(FixError::Hpack(m)) if m.contains("exceeds")),
            "{r:?}"
        );
        let mut input = PREFACE.to_vec();
        frame(&mut input, HEADERS, END_HEADERS, 1, &[0x40, 0x05, b'a']); // literal runs past the end
        assert!(matches!(
            Rewriter::default().feed(&input, &mut Vec::new()),
            Err(FixError::Hpack(_))
        ));
    }

    #[test]
    fn an_oversized_frame_is_refused_at_its_header() {
        // A DATA frame announcing 1 MiB: refused from its 9-byte header alone, so nothing
        // of its payload is ever buffered.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x10, 0x00, 0x00, DATA, 0, 0, 0, 0, 1]);
        let mut rw = Rewriter::default();
        assert_eq!(
            rw.feed(&input, &mut Vec::new()),
            Err(FixError::TooLarge(1 << 20))
        );
        // One byte over the server's frame size is refused too; the size itself passes.
        let mut input = PREFACE.to_vec();
        frame(&mut input, DATA, 0, 1, &vec![0; MAX_FRAME]);
        let mut out = Vec::new();
        Rewriter::default().feed(&input, &mut out).unwrap();
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x00, 0x40, 0x01, DATA, 0, 0, 0, 0, 1]);
        assert!(Rewriter::default().feed(&input, &mut Vec::new()).is_err());
    }

    #[test]
    fn unfinished_requests_are_bounded_per_connection() {
        let mut rw = Rewriter::default();
        let mut out = Vec::new();
        rw.feed(PREFACE, &mut out).unwrap();
        let chunk = vec![0; MAX_FRAME];
        // Finished requests cost nothing however many there are.
        for stream in (1..200u32).step_by(2) {
            let mut f = Vec::new();
            frame(&mut f, DATA, END_STREAM, stream, &chunk[..1000]);
            rw.feed(&f, &mut out).unwrap();
        }
        // Stalled ones add up until the bound.
        let mut refused = None;
        for (i, stream) in (1001..2001u32).step_by(2).enumerate() {
            let mut f = Vec::new();
            frame(&mut f, DATA, 0, stream, &chunk);
            if let Err(e) = rw.feed(&f, &mut out) {
                refused = Some((i, e));
                break;
            }
        }
        let (i, e) = refused.unwrap();
        assert_eq!(i, MAX_OPEN_REQUEST_BYTES / MAX_FRAME, "{e}");
        // A client reset or END_STREAM gives the bytes back.
        let mut rw = Rewriter::default();
        rw.feed(PREFACE, &mut out).unwrap();
        for _ in 0..20 {
            let mut f = Vec::new();
            frame(&mut f, DATA, 0, 1, &chunk);
            frame(&mut f, RST_STREAM, 0, 1, &[0, 0, 0, 8]);
            rw.feed(&f, &mut out).unwrap();
        }
        assert_eq!(rw.open_request_bytes, 0);
    }

    /// An SDS stream stays open for days with a request per response: the messages it
    /// has finished do not add up, but a message in transit still counts, and other
    /// streams are counted as before.
    #[test]
    fn on_sds_streams_only_the_message_in_transit_counts() {
        let mut enc = hpack::Encoder::new();
        let headers = |enc: &mut hpack::Encoder<'_>, path: &[u8]| {
            enc.encode(vec![
                (&b":method"[..], &b"POST"[..]),
                (&b":scheme"[..], &b"http"[..]),
                (&b":path"[..], path),
                (&b":authority"[..], &b"localhost"[..]),
            ])
        };
        let message = |len: usize| {
            let mut m = vec![0u8];
            m.extend_from_slice(&(len as u32).to_be_bytes());
            m.extend(std::iter::repeat_n(7u8, len));
            m
        };
        let mut rw = Rewriter::default();
        let mut out = Vec::new();
        let mut input = PREFACE.to_vec();
        frame(
            &mut input,
            HEADERS,
            END_HEADERS,
            1,
            &headers(&mut enc, STREAMING_PATHS[0]),
        );
        rw.feed(&input, &mut out).unwrap();
        // 200 messages of 4000 bytes (800 KB), each split over two frames.
        for _ in 0..200 {
            let m = message(4000);
            let (a, b) = m.split_at(1234);
            let mut f = Vec::new();
            frame(&mut f, DATA, 0, 1, a);
            rw.feed(&f, &mut out).unwrap();
            assert_eq!(rw.open_request_bytes, 1234);
            let mut f = Vec::new();
            frame(
                &mut f,
                DATA,
                PADDED,
                1,
                &[&[3u8][..], b, &[0, 0, 0]].concat(),
            );
            rw.feed(&f, &mut out).unwrap();
            assert_eq!(rw.open_request_bytes, 0);
        }
        // A message that never ends counts until the bound.
        let m = message(MAX_OPEN_REQUEST_BYTES * 2);
        let refused = m.chunks(MAX_FRAME).any(|c| {
            let mut f = Vec::new();
            frame(&mut f, DATA, 0, 1, c);
            rw.feed(&f, &mut out).is_err()
        });
        assert!(refused);
        // A Workload API stream is counted whole, as before.
        let mut rw = Rewriter::default();
        let mut input = PREFACE.to_vec();
        frame(
            &mut input,
            HEADERS,
            END_HEADERS,
            1,
            &headers(&mut enc, b"/SpiffeWorkloadAPI/FetchX509SVID"),
        );
        rw.feed(&input, &mut out).unwrap();
        let mut f = Vec::new();
        frame(&mut f, DATA, 0, 1, &message(100));
        frame(&mut f, DATA, 0, 1, &message(100));
        rw.feed(&f, &mut out).unwrap();
        assert_eq!(rw.open_request_bytes, 210);
    }

    #[test]
    fn malformed_framing_is_refused() {
        let mut rw = Rewriter::default();
        let mut input = PREFACE.to_vec();
        frame(&mut input, CONTINUATION, END_HEADERS, 1, b"x");
        assert_eq!(
            rw.feed(&input, &mut Vec::new()),
            Err(FixError::Framing("CONTINUATION without HEADERS"))
        );
        let mut rw = Rewriter::default();
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0xff, 0xff, 0xff, HEADERS, 0, 0, 0, 0, 1]);
        assert!(matches!(
            rw.feed(&input, &mut Vec::new()),
            Err(FixError::TooLarge(_))
        ));
        let mut rw = Rewriter::default();
        let mut input = PREFACE.to_vec();
        frame(&mut input, HEADERS, END_HEADERS | PADDED, 1, &[200, 1, 2]);
        assert_eq!(
            rw.feed(&input, &mut Vec::new()),
            Err(FixError::Framing("padding longer than the frame"))
        );
    }
}
