//! The log filter both agents read from `RUST_LOG`.
//!
//! `tracing-subscriber`'s `Targets`, not `EnvFilter`: the directives people
//! write (`debug`, `skerry=debug,quinn=warn`) without a regex engine in
//! binaries whose resident size is one of their features. A `RUST_LOG`
//! that does not parse is reported, not silently replaced.

use tracing_subscriber::filter::{LevelFilter, Targets};

/// The filter `RUST_LOG` asks for, or `default` for every target when it
/// is unset, empty or unreadable (then with a note on stderr saying why).
pub fn filter_from_env(default: LevelFilter) -> Targets {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    parse(&spec, default).unwrap_or_else(|e| {
        eprintln!(
            "RUST_LOG={spec:?} ignored ({e}); write a level (`debug`) or \
             target=level pairs (`skerry=debug,quinn=warn`). Logging at {default}."
        );
        Targets::new().with_default(default)
    })
}

/// An empty spec means `default` for every target.
fn parse(spec: &str, default: LevelFilter) -> Result<Targets, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(Targets::new().with_default(default));
    }
    spec.parse::<Targets>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_target_pairs_parse() {
        let all = parse("debug", LevelFilter::WARN).expect("a level");
        assert!(all.would_enable("quinn", &tracing::Level::DEBUG));
        assert!(!all.would_enable("quinn", &tracing::Level::TRACE));

        let some = parse("skerry=debug,quinn=warn", LevelFilter::WARN).expect("pairs");
        assert!(some.would_enable("skerry::tunnel", &tracing::Level::DEBUG));
        assert!(!some.would_enable("quinn", &tracing::Level::INFO));
        assert!(!some.would_enable("rustls", &tracing::Level::ERROR));
    }

    #[test]
    fn empty_means_the_default_and_nonsense_is_an_error() {
        let empty = parse("  ", LevelFilter::INFO).expect("empty");
        assert!(empty.would_enable("edge_agent", &tracing::Level::INFO));
        assert!(!empty.would_enable("edge_agent", &tracing::Level::DEBUG));
        assert!(parse("skerry=loud", LevelFilter::INFO).is_err());
    }
}
