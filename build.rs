//! Records the commit the binary is built from, for `usersync --version`: a bug report then
//! names the exact code. `USERSYNC_COMMIT` (a Docker build argument) wins; otherwise git is
//! asked; outside a checkout (the image's build context has no .git) it is "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=USERSYNC_COMMIT");
    let commit = std::env::var("USERSYNC_COMMIT")
        .ok()
        .map(|commit| commit.trim().to_owned())
        .filter(|commit| !commit.is_empty())
        .or_else(git_commit)
        .filter(|commit| is_plain(commit))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=USERSYNC_COMMIT={commit}");
}

/// A commit name as git prints one: a newline in a build argument would start a cargo
/// directive of its own (`cargo:rustc-link-arg=...`), so anything else is "unknown".
fn is_plain(commit: &str) -> bool {
    (1..=64).contains(&commit.len())
        && commit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .filter(|text| !text.is_empty())
}

/// The short hash of HEAD, and the files whose change means a new commit (HEAD, the branch
/// it points at, packed refs) so that cargo runs this script again after a commit.
fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])?];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.extend(git(&["rev-parse", "--git-path", &branch]));
    }
    watched.extend(git(&["rev-parse", "--git-path", "packed-refs"]));
    for path in watched {
        println!("cargo:rerun-if-changed={path}");
    }
    Some(commit)
}
