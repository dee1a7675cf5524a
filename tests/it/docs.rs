//! The documentation's own links hold: every relative link in README.md and docs/ names a file
//! that exists and, with an anchor, a heading that file has (GitHub's anchor rule), so that
//! moving a section cannot leave a reader at a dead end.

use std::path::{Path, PathBuf};

/// README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The lines of a Markdown text outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut in_code = false;
    text.lines()
        .filter(|line| {
            if line.starts_with("```") {
                in_code = !in_code;
                return false;
            }
            !in_code
        })
        .collect()
}

/// GitHub's anchor of a heading: lowercase, punctuation dropped, spaces made hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    prose(text)
        .into_iter()
        .filter_map(|line| {
            line.trim_start_matches('#')
                .strip_prefix(' ')
                .filter(|_| line.starts_with('#'))
        })
        .map(anchor)
        .collect()
}

/// The targets of the `[text](target)` links on a page.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in prose(text) {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                found.push(rest[..end].to_owned());
            }
        }
    }
    found
}

#[test]
fn every_relative_link_reaches_its_file_and_heading() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (path, fragment) = match link.split_once('#') {
                Some((path, fragment)) => (path, Some(fragment)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(path)
            };
            if !target.exists() {
                broken.push(format!("{}: {link}: no such file", page.display()));
                continue;
            }
            if let Some(fragment) = fragment {
                let target_text = std::fs::read_to_string(&target).unwrap();
                if !anchors(&target_text).iter().any(|a| a == fragment) {
                    broken.push(format!("{}: {link}: no such heading", page.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_stays_a_front_door() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 200,
        "README.md has {lines} lines: move detail to docs/"
    );
    for page in pages().iter().skip(1) {
        let name = page.file_name().unwrap().to_str().unwrap();
        assert!(
            readme.contains(&format!("(docs/{name})")),
            "README.md does not link docs/{name}"
        );
    }
}

/// docs/options.md, rendered from the command line's own definition: one table per command,
/// with each option's environment variable, default and help. Regenerate it with
/// `USERSYNC_BLESS_DOCS=1 cargo test --test it docs::`.
fn options_reference() -> String {
    use clap::CommandFactory;
    let mut cli = usersync::cli::Cli::command();
    // Built, so that every argument knows how many values it takes.
    cli.build();
    let mut out = String::from(
        "# Options\n\n\
         Generated from `usersync --help` by `tests/it/docs.rs` (which fails when this file and \
         the command line disagree;\n`USERSYNC_BLESS_DOCS=1 cargo test --test it docs::` \
         rewrites it). Every command also takes\n`--log-format text|json` \
         (`USERSYNC_LOG_FORMAT`, default `text`; logs go to stderr, `RUST_LOG` filters).\n\
         The URLs may also come from files: `USERSYNC_SOURCE_URL_FILE`, \
         `USERSYNC_TARGET_URL_FILE`\n(see [Configuration](configuration.md)).\n",
    );
    for command in cli.get_subcommands() {
        let name = command.get_name();
        if name == "help" {
            continue;
        }
        out.push_str(&format!("\n## `usersync {name}`\n\n"));
        if let Some(about) = command.get_about() {
            out.push_str(&format!("{}\n\n", one_line(&about.to_string())));
        }
        out.push_str("| option | environment | default | what it does |\n|---|---|---|---|\n");
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version" | "log_format") || arg.is_hide_set() {
                continue;
            }
            let values = arg
                .get_value_names()
                .map(|names| names.iter().map(|n| format!(" {n}")).collect::<String>())
                .unwrap_or_default();
            let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
            let option = match arg.get_long() {
                Some(long) if takes_value => format!("`--{long}{values}`"),
                Some(long) => format!("`--{long}`"),
                None => format!("`{}`", values.trim()),
            };
            let env = arg
                .get_env()
                .map(|env| format!("`{}`", env.to_string_lossy()))
                .unwrap_or_default();
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| format!("`{}`", v.to_string_lossy()))
                .collect();
            let possible: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|_| takes_value)
                .map(|v| format!("`{}`", v.get_name()))
                .collect();
            let mut help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            if !possible.is_empty() {
                help.push_str(&format!(" (one of {})", possible.join(", ")));
            }
            if arg.is_required_set() {
                help.push_str(" Required.");
            }
            out.push_str(&format!(
                "| {option} | {env} | {} | {} |\n",
                defaults.join(", "),
                one_line(&help).replace('|', "\\|")
            ));
        }
    }
    out
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn the_options_reference_is_the_command_line() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/options.md");
    let rendered = options_reference();
    if std::env::var_os("USERSYNC_BLESS_DOCS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == rendered,
        "docs/options.md differs from the command line: run \
         USERSYNC_BLESS_DOCS=1 cargo test --test it docs:: and commit it"
    );
}
