//! The kubelet's `:authority`, made acceptable to the `h2` crate.
//!
//! The kubelet's plugin watcher dials a plugin's registration socket by its bare path with a
//! custom `unix` dialer and no authority override (`dial` in
//! pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go, 1.32 and 1.34 alike);
//! 1.32's DRA client dials the DRA socket the same way for every NodePrepareResources, and
//! 1.34's still does when it redials for the health stream. grpc-go then derives `:authority`
//! from the path: 1.65 and 1.72 (the releases those kubelets pin) send it percent-encoded
//! (`%2Fvar%2Flib%2Fkubelet%2F...`), older releases sent the path itself. Neither is a URI
//! authority, and `h2` (under hyper and tonic) answers such a request with
//! `RST_STREAM(PROTOCOL_ERROR)` before tonic sees it (hyperium/h2#487, unmerged): the plugin
//! would never register. No setting of h2, hyper or tonic relaxes the check, and no newer
//! release of them drops it (h2 0.4.20, hyper 1.12, tonic 0.14.9 checked).
//!
//! So the plugin's sockets put [`LenientAuthority`] between the socket and the server. It
//! reads the client's HTTP/2 frames, decodes each header block (HPACK, mirroring the client's
//! dynamic table with a real decoder), replaces an `:authority` that the `http` crate (and so
//! `h2`) would refuse by `localhost` (what grpc-go's own `unix:` resolver sends), and hands
//! the block to the server re-encoded as literals that never touch the server's dynamic
//! table, so the two HPACK contexts cannot drift apart. Every other frame passes through
//! byte for byte, and nothing the server writes is touched. A missing `:authority` stays
//! missing (h2 accepts that), a valid one stays as it is.
//!
//! Why this and not a `[patch.crates-io]` fork of h2 that skips the check: the fork would be
//! a vendored copy of the whole crate for the whole workspace, to re-fork on every h2
//! release (and silently unused once a dependency asks for a newer h2); this layer is
//! confined to the plugin's Unix sockets, works with any h2, and is tested against the
//! kubelet's own grpc-go clients (kubelet-plugin/tests/grpc_go_client.rs).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;
use tonic::transport::server::Connected;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE there is (RFC 9113 §6.5.2): rewritten header
/// frames never exceed it, whatever the server announced.
const MIN_MAX_FRAME_SIZE: usize = 16_384;
/// The longest header block (all its frames) accepted; the connection fails beyond it.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// The largest HPACK table the client may switch to. The server announces no
/// SETTINGS_HEADER_TABLE_SIZE (so 4096 applies) and never sees the client's size updates;
/// this only bounds the mirror's memory.
const MAX_TABLE_SIZE: usize = 1 << 16;
/// What replaces an `:authority` h2 would refuse.
const REPLACEMENT: &[u8] = b"localhost";

#[derive(Debug, PartialEq)]
enum State {
    /// Matching the client preface.
    Preface,
    /// HTTP/2 frames.
    Frames,
    /// Not HTTP/2: passed through untouched, for the server to refuse as it always did.
    Opaque,
}

/// A header block being collected from a HEADERS frame and its CONTINUATION frames.
struct Block {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// A server-side connection whose client `:authority` values are made acceptable to `h2`
/// (see the module documentation).
pub struct LenientAuthority<IO> {
    io: IO,
    state: State,
    /// Bytes read from `io`, not yet looked at.
    input: Vec<u8>,
    /// Bytes ready for the server, from `output_at` on.
    output: Vec<u8>,
    output_at: usize,
    /// Payload bytes of the current frame still to pass through as they are.
    passthrough: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
    /// Why the connection failed; reported once the bytes before the fault are delivered.
    failed: Option<(io::ErrorKind, String)>,
}

impl<IO> LenientAuthority<IO> {
    pub fn new(io: IO) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE_SIZE);
        LenientAuthority {
            io,
            state: State::Preface,
            input: Vec::new(),
            output: Vec::new(),
            output_at: 0,
            passthrough: 0,
            block: None,
            decoder,
            eof: false,
            failed: None,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Move `n` input bytes to the output as they are.
    fn pass(&mut self, n: usize) {
        self.output.extend_from_slice(&self.input[..n]);
        self.input.drain(..n);
    }

    /// Turn as much input as is complete into output.
    fn process(&mut self) -> Result<(), String> {
        loop {
            match self.state {
                State::Opaque => {
                    self.pass(self.input.len());
                    return Ok(());
                }
                State::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.state = State::Opaque;
                    } else if n == PREFACE.len() {
                        self.pass(n);
                        self.state = State::Frames;
                    } else {
                        return Ok(());
                    }
                }
                State::Frames if self.passthrough > 0 => {
                    let n = self.passthrough.min(self.input.len());
                    if n == 0 {
                        return Ok(());
                    }
                    self.pass(n);
                    self.passthrough -= n;
                }
                State::Frames => {
                    if self.input.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let h = &self.input[..FRAME_HEADER];
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    let (kind, flags) = (h[3], h[4]);
                    let stream = [h[5], h[6], h[7], h[8]];
                    if self.block.is_some() && kind != CONTINUATION {
                        return Err(format!("frame type {kind} inside a header block"));
                    }
                    match kind {
                        HEADERS | CONTINUATION => {
                            if len > MAX_HEADER_BLOCK {
                                return Err(format!("a {len}-byte header frame"));
                            }
                            if self.input.len() < FRAME_HEADER + len {
                                return Ok(());
                            }
                            let frame: Vec<u8> = self.input.drain(..FRAME_HEADER + len).collect();
                            self.header_frame(kind, flags, stream, &frame[FRAME_HEADER..])?;
                        }
                        // Only servers push; its header block would reach the server's HPACK
                        // context unmirrored.
                        PUSH_PROMISE => return Err("PUSH_PROMISE from a client".into()),
                        _ => {
                            self.pass(FRAME_HEADER);
                            self.passthrough = len;
                        }
                    }
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: [u8; 4],
        payload: &[u8],
    ) -> Result<(), String> {
        if kind == HEADERS {
            let mut rest = payload;
            let mut padding = 0;
            if flags & PADDED != 0 {
                let (&n, tail) = rest.split_first().ok_or("HEADERS without its pad length")?;
                padding = n as usize;
                rest = tail;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let (p, tail) = rest
                    .split_first_chunk::<5>()
                    .ok_or("HEADERS without its priority")?;
                priority = Some(*p);
                rest = tail;
            }
            if padding > rest.len() {
                return Err("HEADERS padding longer than the frame".into());
            }
            self.block = Some(Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: rest[..rest.len() - padding].to_vec(),
            });
        } else {
            let block = self
                .block
                .as_mut()
                .filter(|b| b.stream == stream)
                .ok_or("CONTINUATION without its HEADERS")?;
            if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                return Err("a header block over 1 MiB".into());
            }
            block.fragment.extend_from_slice(payload);
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("collected above");
            self.emit(block)?;
        }
        Ok(())
    }

    /// Decode a complete header block and write it out re-encoded, `:authority` repaired.
    fn emit(&mut self, block: Block) -> Result<(), String> {
        let mut fields = Vec::new();
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                fields.push((name.into_owned(), value.into_owned()))
            })
            .map_err(|e| format!("HPACK: {e}"))?;
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for (name, value) in &fields {
            let value = if name == b":authority" && Authority::try_from(value.as_slice()).is_err() {
                REPLACEMENT
            } else {
                value.as_slice()
            };
            // "Literal Header Field Never Indexed — New Name" (RFC 7541 §6.2.3): nothing enters
            // the server's dynamic table, and a field the client marked never-indexed keeps
            // that mark (which fields it marked is not reported by the decoder).
            encoded.push(0x10);
            encode_string(&mut encoded, name);
            encode_string(&mut encoded, value);
        }
        let mut payload = Vec::with_capacity(5 + encoded.len());
        let mut first_flags = 0;
        if block.end_stream {
            first_flags |= END_STREAM;
        }
        if let Some(p) = block.priority {
            first_flags |= PRIORITY;
            payload.extend_from_slice(&p);
        }
        payload.extend_from_slice(&encoded);
        let frames = payload.len().div_ceil(MIN_MAX_FRAME_SIZE).max(1);
        for i in 0..frames {
            let chunk = &payload[(i * MIN_MAX_FRAME_SIZE).min(payload.len())
                ..((i + 1) * MIN_MAX_FRAME_SIZE).min(payload.len())];
            let (kind, mut flags) = if i == 0 {
                (HEADERS, first_flags)
            } else {
                (CONTINUATION, 0)
            };
            if i + 1 == frames {
                flags |= END_HEADERS;
            }
            let len = (chunk.len() as u32).to_be_bytes();
            self.output
                .extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            self.output.extend_from_slice(&block.stream);
            self.output.extend_from_slice(chunk);
        }
        Ok(())
    }
}

/// An HPACK string literal, not Huffman-coded (RFC 7541 §5.2).
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    // The length is an integer with a 7-bit prefix (RFC 7541 §5.1); H = 0.
    let mut n = s.len();
    if n < 0x7f {
        out.push(n as u8);
    } else {
        out.push(0x7f);
        n -= 0x7f;
        while n >= 0x80 {
            out.push((n & 0x7f) as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

impl<IO: AsyncRead + Unpin> AsyncRead for LenientAuthority<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.output_at < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.output_at);
                buf.put_slice(&this.output[this.output_at..this.output_at + n]);
                this.output_at += n;
                if this.output_at == this.output.len() {
                    this.output.clear();
                    this.output_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some((kind, why)) = &this.failed {
                return Poll::Ready(Err(io::Error::new(
                    *kind,
                    format!("HTTP/2 from the client: {why}"),
                )));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A frame cut short by the client's close goes to the server as it came.
                if this.input.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.pass(this.input.len());
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.input.extend_from_slice(read.filled());
            if let Err(why) = this.process() {
                this.failed = Some((io::ErrorKind::InvalidData, why));
                this.input.clear();
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for LenientAuthority<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for LenientAuthority<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Reads `data` a few bytes at a time, so frames arrive cut at every odd place.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self
                .step
                .min(self.data.len() - self.at)
                .min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A literal with incremental indexing, name from the static table, raw value.
    fn indexed_name_literal(name_index: u8, value: &str) -> Vec<u8> {
        let mut v = vec![0x40 | name_index];
        encode_string(&mut v, value.as_bytes());
        v
    }

    /// What the server reads: the frames, and each header block decoded on its own (so a
    /// block that relied on the server's dynamic table would fail here).
    async fn server_view(client: Vec<u8>, step: usize) -> (Vec<(u8, u8, u32, Vec<u8>)>, Vec<u8>) {
        let mut conn = LenientAuthority::new(Trickle {
            data: client,
            at: 0,
            step,
        });
        let mut out = Vec::new();
        conn.read_to_end(&mut out).await.unwrap();
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut frames = Vec::new();
        let mut rest = &out[PREFACE.len()..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            frames.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        (frames, out)
    }

    fn decode_alone(block: &[u8]) -> Vec<(String, String)> {
        let mut d = loona_hpack::Decoder::new();
        d.set_max_table_size(0);
        d.decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    fn fields(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn the_rfc_7541_requests_decode_the_same_without_the_dynamic_table() {
        // RFC 7541 C.4: three requests with Huffman coding that lean on the dynamic table.
        let blocks = [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ];
        let mut client = PREFACE.to_vec();
        client.extend(frame(0x4, 0, 0, &[]));
        for (i, b) in blocks.iter().enumerate() {
            client.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1 + 2 * i as u32,
                &hex(b),
            ));
        }
        for step in [1, 7, 4096] {
            let (frames, _) = server_view(client.clone(), step).await;
            assert_eq!(frames.len(), 4);
            assert_eq!(frames[0], (0x4, 0, 0, vec![]));
            let decoded: Vec<_> = frames[1..]
                .iter()
                .map(|(kind, flags, _, p)| {
                    assert_eq!((*kind, *flags), (HEADERS, END_HEADERS | END_STREAM));
                    decode_alone(p)
                })
                .collect();
            let first = [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ];
            assert_eq!(decoded[0], fields(&first));
            let mut second = first.to_vec();
            second.push(("cache-control", "no-cache"));
            assert_eq!(decoded[1], fields(&second));
            assert_eq!(
                decoded[2],
                fields(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value"),
                ])
            );
        }
    }

    #[tokio::test]
    async fn authorities_h2_refuses_become_localhost_in_the_table_too() {
        for (authority, expected) in [
            (
                "%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fx-reg.sock",
                "localhost",
            ),
            ("/var/lib/kubelet/plugins_registry/x-reg.sock", "localhost"),
            ("localhost", "localhost"),
            ("example.com:8443", "example.com:8443"),
        ] {
            let mut first = hex("83 86 44"); // POST, http, :path literal with indexing
            encode_string(&mut first, b"/pluginregistration.Registration/GetInfo");
            first.extend(indexed_name_literal(1, authority)); // :authority, now index 63
            let mut client = PREFACE.to_vec();
            client.extend(frame(HEADERS, END_HEADERS, 1, &first));
            client.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
            // The second request names both entries by their dynamic indices.
            client.extend(frame(HEADERS, END_HEADERS, 3, &hex("83 86 bf be")));
            let (frames, _) = server_view(client, 3).await;
            assert_eq!(frames.len(), 3);
            assert_eq!(frames[1], (0x0, END_STREAM, 1, vec![0, 0, 0, 0, 0]));
            for f in [&frames[0], &frames[2]] {
                assert_eq!(
                    decode_alone(&f.3),
                    fields(&[
                        (":method", "POST"),
                        (":scheme", "http"),
                        (":path", "/pluginregistration.Registration/GetInfo"),
                        (":authority", expected),
                    ]),
                    "{authority}"
                );
            }
        }
    }

    #[tokio::test]
    async fn padding_priority_continuation_and_big_blocks() {
        // No :authority at all stays that way; padding goes, priority and END_STREAM stay.
        let mut block = hex("82 86 84");
        block.extend(hex("40"));
        encode_string(&mut block, b"x-big");
        let big = "v".repeat(40_000);
        encode_string(&mut block, big.as_bytes());
        let mut headers = vec![3]; // pad length
        headers.extend([0x80, 0, 0, 1, 15]); // exclusive dependency on 1, weight 15
        headers.extend(&block[..10]);
        headers.extend([0, 0, 0]);
        let mut client = PREFACE.to_vec();
        client.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &headers));
        client.extend(frame(CONTINUATION, 0, 5, &block[10..20_000]));
        client.extend(frame(CONTINUATION, END_HEADERS, 5, &block[20_000..]));
        client.extend(frame(0x8, 0, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE
        let (frames, _) = server_view(client, 1000).await;
        let (last, header_frames) = frames.split_last().unwrap();
        assert_eq!(*last, (0x8, 0, 0, vec![0, 0, 1, 0]));
        assert!(header_frames.len() >= 3, "{}", header_frames.len());
        let mut payload = Vec::new();
        for (i, (kind, flags, stream, p)) in header_frames.iter().enumerate() {
            assert_eq!(*stream, 5);
            assert!(p.len() <= MIN_MAX_FRAME_SIZE);
            let end = if i + 1 == header_frames.len() {
                END_HEADERS
            } else {
                0
            };
            if i == 0 {
                assert_eq!((*kind, *flags), (HEADERS, PRIORITY | END_STREAM | end));
            } else {
                assert_eq!((*kind, *flags), (CONTINUATION, end));
            }
            payload.extend(p);
        }
        assert_eq!(payload[..5], [0x80, 0, 0, 1, 15]);
        assert_eq!(
            decode_alone(&payload[5..]),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("x-big", big.as_str())
            ])
        );
    }

    #[tokio::test]
    async fn broken_input_fails_the_connection_and_other_protocols_pass() {
        let mut client = PREFACE.to_vec();
        client.extend(frame(0x4, 0, 0, &[]));
        client.extend(frame(HEADERS, END_HEADERS, 1, &hex("bf"))); // no such index
        let mut conn = LenientAuthority::new(Trickle {
            data: client,
            at: 0,
            step: 4096,
        });
        let mut out = Vec::new();
        let err = conn.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Everything before the fault was delivered.
        assert_eq!(out.len(), PREFACE.len() + FRAME_HEADER);

        let http1 = b"GET / HTTP/1.1\r\nHost: /a/b\r\n\r\n".to_vec();
        let mut conn = LenientAuthority::new(Trickle {
            data: http1.clone(),
            at: 0,
            step: 5,
        });
        let mut out = Vec::new();
        conn.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, http1);
    }

    #[test]
    fn string_lengths_use_the_7_bit_prefix() {
        let mut v = Vec::new();
        encode_string(&mut v, &[b'a'; 126]);
        assert_eq!(v[0], 126);
        v.clear();
        encode_string(&mut v, &[b'a'; 127]);
        assert_eq!(v[..2], [0x7f, 0]);
        v.clear();
        encode_string(&mut v, &[b'a'; 1337]);
        // 1337 - 127 = 1210 = 0b1001_0111010 -> 0xba 0x09
        assert_eq!(v[..3], [0x7f, 0xba, 0x09]);
    }
}
