//! Any datagram a broker (or an impostor on its socket) can send to a
//! client: decoding never panics, and whatever decodes round-trips.
#![no_main]

use dmabroker_ipc::codec::{decode_server_message, encode_server_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(message) = decode_server_message(bytes) {
        let again = encode_server_message(&message).expect("a decoded message re-encodes");
        assert_eq!(
            decode_server_message(&again).expect("re-encoded message decodes"),
            message
        );
    }
});
