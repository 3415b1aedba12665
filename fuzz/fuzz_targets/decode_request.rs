//! Any datagram a client can send: decoding never panics, and whatever
//! decodes re-encodes to something that decodes to the same request.
#![no_main]

use dmabroker_ipc::codec::{decode_request, decode_request_head, encode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let head = decode_request_head(bytes);
    if let Ok(request) = decode_request(bytes) {
        assert_eq!(
            head,
            Some(request.head),
            "the head decodes alone as it does in the request"
        );
        let again = encode_request(&request).expect("a decoded request re-encodes");
        assert_eq!(
            decode_request(&again).expect("re-encoded request decodes"),
            request
        );
    }
});
