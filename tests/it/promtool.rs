//! The monitoring files under `deploy/`: the Prometheus rules, their unit tests and the example
//! configuration, checked with `promtool` (Debian package `prometheus`); and, without it, that
//! runbook links and metric names agree with docs/operations.md.
//!
//! Without `promtool` on `PATH` the tests print a skip line and pass, so a dev machine needs no
//! Prometheus; with `USERSYNC_REQUIRE_PROMTOOL=1` (as `.ci/run` sets) a missing one fails.

use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::harness::text;

fn prometheus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus")
}

/// `promtool ARGS` run in `deploy/prometheus/`, or `None` when it is not installed.
fn promtool(test: &str, args: &[&str]) -> Option<Output> {
    let run = Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .output();
    match run {
        Ok(output) => Some(output),
        Err(error) if error.kind() == ErrorKind::NotFound => {
            if std::env::var_os("USERSYNC_REQUIRE_PROMTOOL").is_some_and(|v| v == "1") {
                panic!("promtool is not on PATH and USERSYNC_REQUIRE_PROMTOOL=1");
            }
            // Straight to stderr, past the test harness's capture, so the skip shows.
            let _ = writeln!(
                std::io::stderr(),
                "skipped {test}: promtool is not on PATH (apt-get install prometheus)"
            );
            None
        }
        Err(error) => panic!("cannot run promtool: {error}"),
    }
}

/// Asserts that `promtool ARGS` succeeds; false when it was skipped.
fn assert_promtool(test: &str, args: &[&str]) -> bool {
    let Some(output) = promtool(test, args) else {
        return false;
    };
    let said = text(&output);
    assert!(
        output.status.success(),
        "promtool {} failed:\n{said}",
        args.join(" ")
    );
    assert!(said.contains("SUCCESS"), "{said}");
    true
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    let test = "rules_pass_promtool_check_and_unit_tests";
    if assert_promtool(test, &["check", "rules", "usersync-rules.yml"]) {
        assert_promtool(test, &["test", "rules", "usersync-rules.test.yml"]);
    }
}

#[test]
fn example_prometheus_config_is_valid() {
    assert_promtool(
        "example_prometheus_config_is_valid",
        &["check", "config", "prometheus.yml"],
    );
}

fn read(path: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `runbook_url` names a section of the runbook in `docs/operations.md` (GitHub's
/// anchor: the heading in lowercase).
#[test]
fn runbook_urls_point_at_runbook_sections() {
    let rules = read("deploy/prometheus/usersync-rules.yml");
    let operations = read("docs/operations.md");
    let sections: Vec<String> = operations
        .lines()
        .filter_map(|line| line.strip_prefix("### "))
        .map(str::to_lowercase)
        .collect();
    let anchors: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("runbook_url: "))
        .map(|url| {
            url.trim_matches('"')
                .strip_prefix("docs/operations.md#")
                .unwrap_or_else(|| panic!("{url} is not a path to docs/operations.md"))
        })
        .collect();
    assert_eq!(anchors.len(), rules.matches("- alert: ").count());
    for anchor in anchors {
        assert!(
            sections.iter().any(|section| section == anchor),
            "no runbook section for #{anchor}"
        );
    }
}

/// The dashboard and the rules only use metrics `docs/operations.md` documents (histograms through
/// their `_bucket`, `_sum` and `_count` series).
#[test]
fn dashboard_and_rules_use_documented_metrics() {
    let readme = read("docs/operations.md");
    let dashboard = read("deploy/grafana/usersync-dashboard.json");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert_eq!(parsed["uid"], "usersync-lag");
    for panel in parsed["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert!(panel["description"].is_string(), "{}", panel["title"]);
        }
    }
    let documented = |name: &str| {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        readme.contains(&format!("| `{name}` |")) || readme.contains(&format!("| `{base}` |"))
    };
    let rules = read("deploy/prometheus/usersync-rules.yml");
    for text in [&dashboard, &rules] {
        for (start, _) in text.match_indices("usersync_") {
            // Recording rules (`usersync:…`) don't match; `neon_auth.users_sync` isn't a metric.
            if text[..start].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                continue;
            }
            let name: String = text[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                documented(&name),
                "{name} is not in the metrics table of docs/operations.md"
            );
        }
    }
}
