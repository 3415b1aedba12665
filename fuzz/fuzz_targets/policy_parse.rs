//! Any policy file: parsing never panics, errors name the file, and a
//! policy that parses renders (`to_toml`, what `dmabrokerctl policy`
//! shows) to text that parses to the same limits for every identity.
#![no_main]

use std::path::Path;

use dmabroker_policy::{Identity, Policy};
use libfuzzer_sys::fuzz_target;

fn identities() -> Vec<Identity> {
    let who = |uid, gid, exe: Option<&str>, unit: Option<&str>| Identity {
        uid,
        gid,
        groups: vec![gid, 44],
        exe: exe.map(Into::into),
        unit: unit.map(Into::into),
    };
    vec![
        who(0, 0, None, None),
        who(1000, 1000, Some("/usr/bin/camera"), None),
        who(990, 44, None, Some("camera.service")),
    ]
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let policy = match Policy::parse_str(text, Path::new("fuzz.toml")) {
        Ok(policy) => policy,
        Err(err) => {
            assert!(
                err.to_string().starts_with("fuzz.toml"),
                "unlocated error: {err}"
            );
            return;
        }
    };
    let rendered = policy.to_toml();
    let again = Policy::parse_str(&rendered, Path::new("rendered.toml"))
        .unwrap_or_else(|e| panic!("rendered policy does not parse: {e}\n{rendered}"));
    for who in identities() {
        let (a, b) = (policy.resolve(&who), again.resolve(&who));
        assert_eq!(
            a.rule, b.rule,
            "another rule wins after rendering for {who:?}\n{rendered}"
        );
        assert_eq!(
            a.limits, b.limits,
            "limits differ after rendering for {who:?}\n{rendered}"
        );
    }
});
