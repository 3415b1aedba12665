//! Sequences of requests, hang-ups, deaf clients and passing time against
//! an in-process broker (the driver of `tests/broker_sequences.rs`): no
//! panic, every message the broker sends decodes, and after every step the
//! books balance and no end through an end word goes unheard by a waiter
//! (see `check_invariants`).
#![no_main]

#[path = "../../tests/broker_driver/mod.rs"]
mod broker_driver;

use arbitrary::{Result, Unstructured};
use broker_driver::{Body, Driver, Op};
use libfuzzer_sys::fuzz_target;

/// Longest sequence per input: long enough to share, queue and lose a
/// writer, short enough to keep thousands of runs a second.
const MAX_STEPS: usize = 256;

fn size(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=9)? {
        0 => 0,
        1 => u64::MAX - u64::from(u.arbitrary::<u16>()?),
        2..=5 => u64::from(u.arbitrary::<u16>()?),
        _ => u64::from(u.int_in_range(1u32..=64)?) * 4096,
    })
}

fn body(u: &mut Unstructured<'_>) -> Result<Body> {
    Ok(match u.int_in_range(0..=10)? {
        0 => Body::Hello {
            version_ok: u.ratio(9, 10)?,
            autofence: u.arbitrary()?,
            buffer_words: u.arbitrary()?,
        },
        1 => Body::ListHeaps,
        2 => Body::Alloc {
            size: size(u)?,
            heap: u.arbitrary()?,
        },
        3 => Body::Free {
            buffer: u.arbitrary()?,
        },
        4 => Body::Export {
            buffer: u.arbitrary()?,
        },
        5 => Body::Import {
            token: u.arbitrary()?,
        },
        6 => Body::Info {
            buffer: u.arbitrary()?,
        },
        7 => Body::Adopt,
        8 => Body::Begin {
            buffer: u.arbitrary()?,
            access: u.arbitrary()?,
            timeout_ms: u.arbitrary::<Option<u8>>()?.map(u16::from),
        },
        9 => Body::End {
            access: u.arbitrary()?,
            with_fence: u.ratio(1, 10)?,
        },
        // Cancel shares the last kind's draw, so that inputs saved before
        // it existed decode as they did up to their first draw of it.
        _ if u.ratio(1, 2)? => Body::Cancel {
            begin: u.arbitrary()?,
        },
        _ => Body::Reattach {
            buffer: u.arbitrary()?,
        },
    })
}

fn op(u: &mut Unstructured<'_>) -> Result<Op> {
    Ok(match u.int_in_range(0..=30)? {
        0 => Op::Connect {
            hello: u.ratio(9, 10)?,
        },
        1 => Op::Disconnect {
            client: u.arbitrary()?,
        },
        2 => Op::ToggleDeaf {
            client: u.arbitrary()?,
        },
        3 => Op::Raw {
            client: u.arbitrary()?,
            bytes: u.arbitrary()?,
            fds: u.arbitrary()?,
        },
        4 | 5 => Op::Wait {
            ms: u.arbitrary::<u8>()?.into(),
        },
        6..=8 => Op::EndThroughWord {
            client: u.arbitrary()?,
            access: u.arbitrary()?,
        },
        9 => Op::Scribble {
            client: u.arbitrary()?,
            access: u.arbitrary()?,
            kind: u.arbitrary()?,
        },
        10..=12 => Op::WordBegin {
            client: u.arbitrary()?,
            buffer: u.arbitrary()?,
            access: u.int_in_range(0..=2)?,
        },
        13..=15 => Op::WordEnd {
            client: u.arbitrary()?,
            hold: u.arbitrary()?,
        },
        17 => Op::WordEndLate {
            client: u.arbitrary()?,
            hold: u.arbitrary()?,
        },
        16 => Op::WordScribble {
            client: u.arbitrary()?,
            buffer: u.arbitrary()?,
            value: u.arbitrary()?,
        },
        _ => Op::Request {
            client: u.arbitrary()?,
            body: body(u)?,
            no_reply: u.ratio(1, 5)?,
        },
    })
}

fuzz_target!(|bytes: &[u8]| {
    let mut u = Unstructured::new(bytes);
    let Ok(tight) = u.arbitrary::<bool>() else {
        return;
    };
    let mut driver = Driver::new(tight);
    for step in 0..MAX_STEPS {
        // An exhausted `Unstructured` yields defaults forever: stop instead,
        // so a sequence is as long as its input.
        if u.is_empty() {
            break;
        }
        let Ok(op) = op(&mut u) else {
            break;
        };
        if let Err(broken) = driver.step(&op) {
            panic!("after step {step} ({op:?}): {broken}");
        }
    }
    if let Err(broken) = driver.finish() {
        panic!("after every client left: {broken}");
    }
});
