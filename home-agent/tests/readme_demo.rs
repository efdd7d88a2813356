//! The README's first command, run as written: `sudo ./scripts/demo-local`
//! starts a local edge, serves a small HTTP server's page through it, and
//! prints it. The built binary is handed over so the script does not run
//! cargo inside cargo.

use std::process::Command;

#[test]
fn readme_demo_serves_a_request_through_the_local_edge() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs the local edge (network namespace, TUN device): run the suite as root (sudo ./scripts/test)"
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/demo-local"))
        .env("SKERRY_HOME_AGENT", env!("CARGO_BIN_EXE_home-agent"))
        .output()
        .expect("running scripts/demo-local");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo-local failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("hello from home, through skerry"),
        "the page did not come through\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("tcp/8080"), "{stdout}");
}
