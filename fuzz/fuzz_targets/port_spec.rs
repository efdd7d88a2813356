//! Port specs come from users and config files: any text must either parse
//! or be refused with an error, never panic, and whatever parses must print
//! in a form that parses back to the same value.
#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use skerry::portmap::{Cidr, PortKey, PortSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = PortSpec::from_str(text) {
        let printed = spec.to_string();
        let again = PortSpec::from_str(&printed)
            .unwrap_or_else(|e| panic!("`{printed}`, printed from `{text}`, is refused: {e}"));
        assert_eq!(again, spec, "`{text}` printed as `{printed}`");
        assert_eq!(again.to_string(), printed);
        for port in spec.ports.iter() {
            assert!(spec.target_for(port).is_some(), "{printed}: no target for {port}");
        }
    }
    // The same text through the smaller parsers the CLI also calls.
    if let Ok(key) = PortKey::from_str(text) {
        assert_eq!(PortKey::from_str(&key.to_string()), Ok(key));
    }
    if let Ok(cidr) = Cidr::from_str(text) {
        assert_eq!(Cidr::from_str(&cidr.to_string()), Ok(cidr));
    }
});
