//! Arbitrary bytes, cut into arbitrary messages, through a `FrameDecoder`.
//!
//! Input layout: byte 0 picks the buffer bound (small bounds exercise overflow), the next 8
//! bytes are message sizes used cyclically, the rest is the stream. Invariants checked: no
//! panic, buffered bytes within the bound, every packet re-verifies and is a contiguous slice
//! of the input, bad events are never empty, and `finish` drains the decoder completely.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorflow_protocol::{Frame, FrameDecoder, PacketView};

fuzz_target!(|data: &[u8]| {
    let Some((&bound, rest)) = data.split_first() else { return };
    let (sizes, stream) = rest.split_at(rest.len().min(8));
    let mut decoder = match bound % 4 {
        0 => FrameDecoder::default(),
        1 => FrameDecoder::new(64, 2),
        2 => FrameDecoder::new(256, 8),
        _ => FrameDecoder::new(usize::from(bound) * 16, u16::from(bound)),
    };

    let check = |frame: Frame<'_>| match frame {
        Frame::Packet(p) => {
            let bytes = p.as_bytes();
            assert_eq!(PacketView::parse(bytes), Ok(p), "decoder returned a frame that does not verify");
            assert_eq!(p.frame_len(), bytes.len());
            assert_eq!(p.samples().len(), p.len());
            assert!(p.len() <= usize::from(decoder_limit(bound)), "packet above the sample limit");
            assert!(
                stream.windows(bytes.len()).any(|w| w == bytes),
                "packet bytes are not a contiguous slice of the input"
            );
        }
        Frame::Bad { reason, bytes } => assert!(bytes > 0, "empty {reason} event"),
    };

    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let size = sizes.get(i % sizes.len().max(1)).map_or(rest.len(), |&s| usize::from(s).max(1));
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        i += 1;
        decoder.push(chunk);
        assert!(decoder.pending().len() <= decoder.max_buffer_bytes());
        while let Some(frame) = decoder.next_frame() {
            check(frame);
        }
    }
    while let Some(frame) = decoder.finish() {
        check(frame);
    }
    assert!(decoder.pending().is_empty(), "finish must drain the decoder");
    assert!(decoder.next_frame().is_none());
});

/// The sample limit the decoder was built with (before it is lowered to fit the buffer).
fn decoder_limit(bound: u8) -> u16 {
    match bound % 4 {
        0 => 1024,
        1 => 2,
        2 => 8,
        _ => u16::from(bound),
    }
}
