//! Lifting the open-file limit to what the system allows.
//!
//! Each relayed TCP connection holds six descriptors in each agent (its two
//! sockets and a pipe each way for `splice`), each UDP flow one socket at
//! home. Under a shell or `sudo` the soft limit is 1024: some 170 open
//! connections, or a thousand one-byte datagrams from as many client ports
//! (no handshake needed), would use it up, and then no port would accept
//! anything. The hard limit is what the administrator allows (systemd
//! gives services 524288; the edge image's unit sets 65536); the soft one
//! is only a default for programs that do not ask.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Enough for any home's traffic: a hard limit may be unlimited, and the
/// soft one need not follow it there (this is also the kernel's default
/// `fs.nr_open`).
const CEILING: u64 = 1 << 20;

/// Raises the soft limit on open files to the hard limit (at most
/// 2^20); the soft limit now.
pub fn raise() -> Result<u64, nix::Error> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = hard.min(CEILING).max(soft);
    if target <= soft {
        return Ok(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => Ok(target),
        // The hard limit is above `fs.nr_open` (lowered since it was set),
        // and the kernel takes no limit above that: both go down to it.
        Err(nix::Error::EPERM) => {
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(nix::Error::EPERM)?;
            let hard = hard.min(nr_open);
            let target = target.min(hard).max(soft);
            setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
            Ok(target)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "SKERRY_FD_LIMIT_TEST_CHILD";

    /// Runs in a child process of its own: lowering the limit here would
    /// starve the tests running beside it.
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        if std::env::var_os(CHILD).is_some() {
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
            // As under a shell.
            setrlimit(Resource::RLIMIT_NOFILE, 256.min(hard), hard).unwrap();
            let raised = raise().unwrap();
            let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
            assert_eq!(soft, raised);
            assert_eq!(soft, hard.min(CEILING).max(256.min(hard)));
            println!("checked in the child: soft limit {soft}");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "fd_limit::tests::the_soft_limit_is_raised_to_the_hard_one",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("checked in the child"),
            "the child's check failed or did not run: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
