//! Feeds arbitrary bytes, in arbitrary chunkings, to the frame decoder and the
//! request/response decoders: nothing may panic, allocate past the frame limit,
//! or loop.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metta_proto::{FrameDecoder, Request, Response};

fuzz_target!(|data: &[u8]| {
    let (split, bytes) = match data.split_first() {
        Some((s, rest)) => (*s as usize + 1, rest),
        None => return,
    };
    let mut d = FrameDecoder::new(64 * 1024);
    for chunk in bytes.chunks(split) {
        d.push(chunk);
        loop {
            match d.next_payload() {
                Ok(Some(p)) => {
                    let _ = metta_proto::frame::decode::<Request>(&p);
                    let _ = metta_proto::frame::decode::<Response>(&p);
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = d.finish();
});
