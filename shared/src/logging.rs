//! The log filter both agents read from `RUST_LOG`.
//!
//! `tracing-subscriber`'s `Targets`, not `EnvFilter`: the directives people
//! write (`debug`, `info,skerry=debug,quinn=warn`) without a regex engine in
//! binaries whose resident size is one of their features. A `RUST_LOG`
//! that does not parse is reported, not silently replaced.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;

/// An agent's subscriber: lines to `writer`, filtered by `filter` alone.
/// (`fmt()`'s own maximum level is info: left in place, it would silence
/// the debug lines a `RUST_LOG=debug` asks for.)
pub fn subscriber<W>(writer: W, filter: Targets) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_max_level(LevelFilter::TRACE)
        // A log line that cannot be written is lost, not a panic: the
        // subscriber's own report of it would go through eprintln!.
        .log_internal_errors(false)
        .finish()
        .with(filter)
}

/// The filter `RUST_LOG` asks for, or `default` when it is unset, empty or
/// unreadable (then with a note on stderr saying why). Unless it asks for
/// debug or names them, rustls and quinn-proto log errors only.
pub fn filter_from_env(default: LevelFilter) -> Targets {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    parse(&spec, default).unwrap_or_else(|e| {
        eprintln!(
            "RUST_LOG={spec:?} ignored ({e}); write a level (`debug`) or \
             target=level pairs after it (`info,skerry=debug,quinn=warn`). Logging at {default}."
        );
        quieten_peers(Targets::new().with_default(default))
    })
}

/// Libraries whose warnings are about what a peer sent (an illegal SNI, a
/// packet that does not parse): on the edge's public control port anyone
/// can cause one per packet. At info and below only their errors are
/// logged; the edge logs each refused connection itself, within a budget.
/// (The home-agent, at warn, loses their warnings about its own outgoing
/// handshake too; its own error says what failed.)
const PEER_CHATTER: [&str; 2] = ["rustls", "quinn_proto"];

/// Errors only for [`PEER_CHATTER`], unless the filter's default level is
/// debug or more, or it names them itself: by their own name or a module
/// of theirs, or by a prefix (`quinn` covers `quinn_proto`) at debug or more.
fn quieten_peers(targets: Targets) -> Targets {
    let Some(level) = targets.default_level().filter(|l| *l <= LevelFilter::INFO) else {
        return targets;
    };
    let named: Vec<(String, LevelFilter)> =
        targets.iter().map(|(t, l)| (t.to_owned(), l)).collect();
    let asked_for = |chatter: &str| {
        named.iter().any(|(t, l)| {
            t == chatter
                || t.strip_prefix(chatter)
                    .is_some_and(|rest| rest.starts_with("::"))
                || (chatter.starts_with(t.as_str()) && *l > LevelFilter::INFO)
        })
    };
    PEER_CHATTER
        .iter()
        .filter(|chatter| !asked_for(chatter))
        .fold(targets, |t, chatter| {
            t.with_target(*chatter, LevelFilter::ERROR.min(level))
        })
}

/// An empty spec means `default` for every target.
fn parse(spec: &str, default: LevelFilter) -> Result<Targets, String> {
    let spec = spec.trim();
    let targets = if spec.is_empty() {
        Targets::new().with_default(default)
    } else {
        spec.parse::<Targets>().map_err(|e| e.to_string())?
    };
    Ok(quieten_peers(targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_asked_for_is_the_level_logged() {
        let enabled = |spec: &str, level: tracing::Level| {
            let filter = parse(spec, LevelFilter::INFO).expect("a filter");
            tracing::subscriber::with_default(subscriber(std::io::sink, filter), || match level {
                tracing::Level::TRACE => tracing::enabled!(tracing::Level::TRACE),
                tracing::Level::DEBUG => tracing::enabled!(tracing::Level::DEBUG),
                _ => tracing::enabled!(tracing::Level::INFO),
            })
        };
        assert!(enabled("debug", tracing::Level::DEBUG));
        assert!(enabled("trace", tracing::Level::TRACE));
        assert!(enabled("", tracing::Level::INFO));
        assert!(!enabled("", tracing::Level::DEBUG));
        assert!(!enabled("warn", tracing::Level::INFO));
    }

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

    #[test]
    fn by_default_what_peers_cause_in_libraries_is_logged_only_as_errors() {
        let default = parse("", LevelFilter::INFO).expect("empty");
        for target in ["rustls::msgs::handshake", "quinn_proto::connection"] {
            assert!(
                !default.would_enable(target, &tracing::Level::WARN),
                "{target}"
            );
            assert!(
                default.would_enable(target, &tracing::Level::ERROR),
                "{target}"
            );
        }
        assert!(default.would_enable("quinn", &tracing::Level::WARN));
        // The edge's unit file says RUST_LOG=info: the same.
        let info = parse("info", LevelFilter::WARN).expect("a level");
        assert!(!info.would_enable("quinn_proto::endpoint", &tracing::Level::WARN));
        assert!(info.would_enable("edge_agent", &tracing::Level::INFO));
        // Asked for, by level or by name, they are all there.
        let debug = parse("debug", LevelFilter::INFO).expect("a level");
        assert!(debug.would_enable("rustls::msgs::handshake", &tracing::Level::DEBUG));
        let named = parse("info,rustls=warn", LevelFilter::INFO).expect("pairs");
        assert!(named.would_enable("rustls::msgs::handshake", &tracing::Level::WARN));
        assert!(!named.would_enable("quinn_proto::connection", &tracing::Level::WARN));
        // A prefix asked for at debug covers quinn_proto; at warn it does not.
        let quinn = parse("info,quinn=debug", LevelFilter::INFO).expect("pairs");
        assert!(quinn.would_enable("quinn_proto::connection", &tracing::Level::DEBUG));
        let quinn = parse("info,quinn=warn", LevelFilter::INFO).expect("pairs");
        assert!(!quinn.would_enable("quinn_proto::connection", &tracing::Level::WARN));
        // Another crate with a like name is not rustls.
        let pem = parse("info,rustls_pemfile=warn", LevelFilter::INFO).expect("pairs");
        assert!(!pem.would_enable("rustls::msgs::handshake", &tracing::Level::WARN));
        // A default of "off" stays off for them too.
        assert!(
            !parse("", LevelFilter::OFF)
                .expect("empty")
                .would_enable("rustls", &tracing::Level::ERROR)
        );
    }
}
