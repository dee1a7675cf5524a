//! Fan-out: which target each user goes to, from a routes file (`--routes FILE`).
//!
//! One identity store often holds many tenancies (Stack Auth keeps every project in one
//! database), each with a database of its own. One slot, one decoder and one reader then
//! feed every target: a source column (the tenancy) picks the route of each row, and each
//! route is one target with its own writer and its own checkpoint row (see
//! [`crate::config::Config::checkpoint_key`]). A routes file:
//!
//! ```toml
//! route_by = "tenancyId"          # stack-auth's default; other profiles must name one
//!
//! [[route]]
//! name = "acme"
//! values = ["5f8c8b8e-…"]          # the column's values, as PostgreSQL prints them
//! target_file = "/etc/usersync/acme-target-url"
//!
//! [[route]]
//! name = "rest"
//! default = true                  # every value no other route names
//! target = "postgresql://…"       # or the URL itself (then keep this file private)
//! ```
//!
//! The column must be in the replica identity of every table of the profile (a primary-key
//! column, or `REPLICA IDENTITY FULL`): a deleted row arrives with that identity only, and
//! must still find its route.

use std::collections::HashMap;
use std::path::Path;

use postgres_protocol::escape::escape_identifier;
use serde::Deserialize;

use crate::config::TableName;
use crate::conn::url::PgUrl;
use crate::decode::RelationColumn;
use crate::error::Error;

/// Routes per file at most: each is a target connection (two while it copies), and the
/// number a reader feeds at once is what the bench measured.
pub const MAX_ROUTES: usize = 1_000;
/// A routes file larger than this is the wrong file.
const MAX_ROUTES_FILE_BYTES: u64 = 4 << 20;

/// A validated routes file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    /// The source column whose value picks the route.
    pub by: String,
    pub routes: Vec<RouteSpec>,
    /// Where a value no route names goes (an index into `routes`); `None`: nowhere, the row
    /// is not replicated.
    pub default: Option<usize>,
}

/// One route: a target and the values of the routing column it receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub name: String,
    pub target: PgUrl,
    /// Empty for the default route.
    pub values: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    route_by: Option<String>,
    #[serde(default)]
    route: Vec<RouteEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    name: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    default: bool,
    target: Option<String>,
    target_file: Option<std::path::PathBuf>,
}

impl Routes {
    /// Reads and validates the routes file at `path`; `default_by` is the profile's routing
    /// column, if it has one (stack-auth: `tenancyId`).
    pub fn load(path: &Path, default_by: Option<&str>) -> Result<Routes, Error> {
        let origin = format!("--routes {}", path.display());
        let text =
            crate::config::read_private_file("routes file", &origin, path, MAX_ROUTES_FILE_BYTES)?;
        Routes::parse(&text, &origin, default_by, |path| {
            crate::config::read_private_file(
                "target URL",
                &format!("target_file {} (in {origin})", path.display()),
                path,
                crate::config::MAX_URL_FILE_BYTES,
            )
        })
    }

    /// Whether two routes write to the same database: they would undo each other (a copy
    /// that reconciles soft-deletes the other route's users; a user moving between them is
    /// written by two writers in no set order). A route may take several values instead.
    fn check_distinct_targets(routes: &[RouteSpec], origin: &str) -> Result<(), Error> {
        let mut seen: HashMap<(String, u16, String), &str> = HashMap::new();
        for route in routes {
            let target = &route.target;
            let key = (target.host.clone(), target.port, target.dbname.clone());
            if let Some(other) = seen.insert(key, &route.name) {
                return Err(Error::Config(format!(
                    "{origin}: routes {other} and {} write to the same database ({}:{}/{}); \
                     give each database one route, which may list several values",
                    route.name, target.host, target.port, target.dbname
                )));
            }
        }
        Ok(())
    }

    /// [`Routes::load`], with every target's `allow_plaintext_password` set to `allowed`
    /// (`--allow-plaintext-password`).
    pub fn load_allowing(
        path: &Path,
        default_by: Option<&str>,
        allowed: bool,
    ) -> Result<Routes, Error> {
        let mut routes = Routes::load(path, default_by)?;
        for route in &mut routes.routes {
            route.target.allow_plaintext_password = allowed;
        }
        Ok(routes)
    }

    /// [`Routes::load`] on the file's text, reading `target_file`s with `read`.
    pub fn parse(
        text: &str,
        origin: &str,
        default_by: Option<&str>,
        read: impl Fn(&Path) -> Result<String, Error>,
    ) -> Result<Routes, Error> {
        let invalid = |what: String| Error::Config(format!("{origin}: {what}"));
        // The parser's message quotes the offending line, which may hold a target URL with
        // its password: only the position is said.
        let file: RoutesFile = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let before = text.get(..span.start).unwrap_or(text);
                    let line = before.matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            invalid(format!(
                "not a valid routes file{at}: {}; see docs/fan-out.md for its format",
                before_any_quote(e.message())
            ))
        })?;
        let by = match (file.route_by, default_by) {
            (Some(by), _) if !by.is_empty() => by,
            (Some(_), _) => return Err(invalid("route_by must not be empty".into())),
            (None, Some(by)) => by.to_owned(),
            (None, None) => {
                return Err(invalid(
                    "route_by is missing: name the source column whose value picks the route \
                     (this profile has no default)"
                        .into(),
                ))
            }
        };
        if file.route.is_empty() {
            return Err(invalid(
                "no [[route]]: give at least one route (name, values, target_file)".into(),
            ));
        }
        if file.route.len() > MAX_ROUTES {
            return Err(invalid(format!(
                "{} routes, more than the {MAX_ROUTES} one process serves; split the \
                 tenancies over several usersync deployments (docs/fan-out.md)",
                file.route.len()
            )));
        }
        let mut routes = Vec::with_capacity(file.route.len());
        let mut default = None;
        let mut names = HashMap::new();
        let mut owners: HashMap<String, String> = HashMap::new();
        for (index, entry) in file.route.into_iter().enumerate() {
            validate_route_name(&entry.name).map_err(invalid)?;
            if names.insert(entry.name.clone(), index).is_some() {
                return Err(invalid(format!(
                    "two routes are named {}; give each route a name of its own",
                    entry.name
                )));
            }
            let name = &entry.name;
            match (entry.default, entry.values.is_empty()) {
                (true, false) => {
                    return Err(invalid(format!(
                        "route {name} is the default and has values; a default route takes \
                         every value no other route names, so give it none"
                    )))
                }
                (false, true) => {
                    return Err(invalid(format!(
                        "route {name} has no values: list the values of {by} it receives, or \
                         make it the default (default = true)"
                    )))
                }
                (true, true) => {
                    if default.is_some() {
                        return Err(invalid(
                            "more than one route has default = true; keep one".into(),
                        ));
                    }
                    default = Some(index);
                }
                (false, false) => {}
            }
            for value in &entry.values {
                if let Some(owner) = owners.insert(value.clone(), name.clone()) {
                    return Err(invalid(format!(
                        "the value {} is listed by route {owner} and by route {name}; a value \
                         goes to one route",
                        shown(value)
                    )));
                }
            }
            let url = match (entry.target, entry.target_file) {
                (Some(url), None) => url,
                (None, Some(path)) => {
                    if path.to_string_lossy().contains("://") {
                        return Err(invalid(format!(
                            "route {name}: target_file holds a URL, not the path of a file; \
                             put the URL in a file and name that file here (or use target)"
                        )));
                    }
                    read(&path)?
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(format!(
                        "route {name} has both target and target_file; keep one (target_file \
                         keeps the password out of this file)"
                    )))
                }
                (None, None) => {
                    return Err(invalid(format!(
                        "route {name} has no target: give target_file (a file holding its \
                         URL) or target"
                    )))
                }
            };
            let target = url.parse::<PgUrl>().map_err(|source| {
                Error::Config(format!(
                    "{origin}: route {name}: invalid target URL: {source}"
                ))
            })?;
            routes.push(RouteSpec {
                name: entry.name,
                target,
                values: entry.values,
            });
        }
        Routes::check_distinct_targets(&routes, origin)?;
        Ok(Routes {
            by,
            routes,
            default,
        })
    }

    /// Which route each value goes to, for the reader.
    pub fn router(&self) -> Router {
        let mut by_value = HashMap::new();
        for (index, route) in self.routes.iter().enumerate() {
            for value in &route.values {
                by_value.insert(value.clone(), index);
            }
        }
        Router {
            by_value,
            default: self.default,
        }
    }

    /// The rows of the users table route `index` receives, as an SQL condition on its
    /// routing column, qualified by `alias` if given: what its copy reads.
    pub fn copy_filter(&self, index: usize, alias: Option<&str>) -> String {
        let column = match alias {
            Some(alias) => format!("{alias}.{}", escape_identifier(&self.by)),
            None => escape_identifier(&self.by),
        };
        let list = |values: &mut dyn Iterator<Item = &String>| {
            values
                .map(|value| postgres_protocol::escape::escape_literal(value))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if Some(index) == self.default {
            let named = list(&mut self.routes.iter().flat_map(|route| route.values.iter()));
            // NULL goes to the default route in the stream ([`Router::route`]), so here too.
            if named.is_empty() {
                "true".to_owned()
            } else {
                format!("({column} IS NULL OR {column}::text NOT IN ({named}))")
            }
        } else {
            format!(
                "{column}::text IN ({})",
                list(&mut self.routes[index].values.iter())
            )
        }
    }
}

/// A parser message up to its first quoted text: what follows a quote may be the file's
/// own text (a password), and no quoting rule of the parser's is safe to rely on (a key may
/// hold any character, a Debug string escapes only its own quote). The line number says
/// where.
fn before_any_quote(message: &str) -> String {
    let line = message.lines().next().unwrap_or("");
    match line.find(['"', '`', '\'']) {
        Some(at) => format!("{}…", line[..at].trim_end()),
        None => line.to_owned(),
    }
}

/// A value of the routes file for a message, unless it looks like a URL (a password may
/// have been pasted into the wrong place).
fn shown(value: &str) -> String {
    if value.contains("://") || value.contains('@') || value.len() > 64 {
        "(a value that looks like a URL or is too long to show)".to_owned()
    } else {
        format!("{value:?}")
    }
}

/// Route names go into the checkpoint's key (`slot:route`), into metrics labels and logs.
fn validate_route_name(name: &str) -> Result<(), String> {
    const MAX: usize = 63;
    let valid = !name.is_empty()
        && name.len() <= MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid route name {}: use 1 to {MAX} lower-case letters, digits, '_' or '-'",
            shown(name)
        ))
    }
}

/// Type OIDs a routing column may have: types whose text form is one spelling per value
/// and the same in the stream (the type's output) and in the copy (`::text`). `char(n)`
/// pads, `boolean` prints `t` in one and `true` in the other, and the like: refused.
const ROUTABLE_TYPES: [(u32, &str); 6] = [
    (25, "text"),
    (1043, "varchar"),
    (2950, "uuid"),
    (21, "smallint"),
    (23, "integer"),
    (20, "bigint"),
];

impl Routes {
    /// Where `columns` (a table of the profile, as the catalog or the stream describes it)
    /// hold the routing column. It must exist, be in the replica identity (a deleted row
    /// arrives with that identity only and must still find its route), have a type whose
    /// text is one spelling per value, and every value of the routes file must be spelled
    /// as PostgreSQL prints that type (a uuid in lower case), or it would match no row.
    pub fn column_in(&self, table: &TableName, columns: &[RelationColumn]) -> Result<usize, Error> {
        let column = &self.by;
        let Some(index) = columns.iter().position(|c| &c.name == column) else {
            return Err(Error::Config(format!(
                "the routes file routes by column {column}, which {table} does not have (or \
                 does not publish); every table of the profile needs it (route_by names it)"
            )));
        };
        if !columns[index].is_key {
            return Err(Error::Config(format!(
                "the routing column {column} is not in the replica identity of {table}, so a \
                 deleted row could not be routed: route by a column of its primary key, or \
                 run ALTER TABLE {} REPLICA IDENTITY FULL",
                table.quoted()
            )));
        }
        let type_oid = columns[index].type_oid;
        let Some((_, type_name)) = ROUTABLE_TYPES.iter().find(|(oid, _)| *oid == type_oid) else {
            return Err(Error::Config(format!(
                "the routing column {column} of {table} has a type (oid {type_oid}) whose text \
                 usersync cannot match reliably; route by a text, varchar, uuid or integer \
                 column"
            )));
        };
        for route in &self.routes {
            for value in &route.values {
                if !spelled_as_printed(type_name, value) {
                    return Err(Error::Config(format!(
                        "route {}: the value {} is not how PostgreSQL prints a {type_name} \
                         (column {column} of {table}), so no row would match it; write it \
                         as SELECT {column}::text shows it",
                        route.name,
                        shown(value)
                    )));
                }
            }
        }
        Ok(index)
    }
}

/// Whether `value` is a value of type `type_name` as its output function prints it.
fn spelled_as_printed(type_name: &str, value: &str) -> bool {
    match type_name {
        "uuid" => {
            value.len() == 36
                && value.char_indices().all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => c == '-',
                    _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
                })
        }
        "smallint" | "integer" | "bigint" => value
            .parse::<i64>()
            .is_ok_and(|number| number.to_string() == value),
        _ => true,
    }
}

/// Which route a routing value goes to.
#[derive(Debug, Clone)]
pub struct Router {
    by_value: HashMap<String, usize>,
    default: Option<usize>,
}

impl Router {
    /// The route of a row whose routing column holds `value` (`None`: SQL NULL); `None`: no
    /// route, the row is not replicated.
    pub fn route(&self, value: Option<&str>) -> Option<usize> {
        match value {
            Some(value) => self.by_value.get(value).copied().or(self.default),
            None => self.default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Routes, Error> {
        Routes::parse(text, "routes.toml", Some("tenancyId"), |path| {
            Ok(format!(
                "postgresql://u:secret@{}/db",
                path.display().to_string().trim_start_matches('/')
            ))
        })
    }

    fn message(result: Result<Routes, Error>) -> String {
        match result {
            Ok(routes) => panic!("accepted: {routes:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn routes_values_to_targets_with_an_optional_default() {
        let routes = parse(
            r#"
            [[route]]
            name = "acme"
            values = ["a", "b"]
            target_file = "/acme"

            [[route]]
            name = "rest"
            default = true
            target = "postgresql://u@rest/db"
            "#,
        )
        .unwrap();
        assert_eq!(routes.by, "tenancyId");
        assert_eq!(routes.routes[0].target.host, "acme");
        assert_eq!(routes.routes[1].target.host, "rest");
        assert_eq!(routes.default, Some(1));
        let router = routes.router();
        assert_eq!(router.route(Some("a")), Some(0));
        assert_eq!(router.route(Some("b")), Some(0));
        assert_eq!(router.route(Some("c")), Some(1));
        assert_eq!(router.route(None), Some(1));
        assert_eq!(
            routes.copy_filter(0, Some("u")),
            "u.\"tenancyId\"::text IN ('a', 'b')"
        );
        assert_eq!(
            routes.copy_filter(1, None),
            "(\"tenancyId\" IS NULL OR \"tenancyId\"::text NOT IN ('a', 'b'))"
        );
    }

    #[test]
    fn without_a_default_an_unnamed_value_goes_nowhere() {
        let routes = parse(
            r#"
            route_by = "tenant"
            [[route]]
            name = "one"
            values = ["1"]
            target = "postgresql://u@one/db"
            "#,
        )
        .unwrap();
        assert_eq!(routes.by, "tenant");
        let router = routes.router();
        assert_eq!(router.route(Some("1")), Some(0));
        assert_eq!(router.route(Some("2")), None);
        assert_eq!(router.route(None), None);
    }

    #[test]
    fn a_bad_routes_file_says_what_to_fix() {
        let cases = [
            ("", "no [[route]]"),
            (
                "[[route]]\nname = \"Acme\"\nvalues=[\"a\"]\ntarget_file=\"/x\"",
                "invalid route name",
            ),
            (
                "[[route]]\nname = \"a\"\ntarget_file=\"/x\"",
                "has no values",
            ),
            (
                "[[route]]\nname = \"a\"\nvalues=[\"v\"]\ndefault=true\ntarget_file=\"/x\"",
                "is the default and has values",
            ),
            (
                "[[route]]\nname = \"a\"\nvalues=[\"v\"]\ntarget_file=\"/x\"\n\
                 [[route]]\nname = \"b\"\nvalues=[\"v\"]\ntarget_file=\"/y\"",
                "listed by route a and by route b",
            ),
            (
                "[[route]]\nname = \"a\"\nvalues=[\"v\"]\ntarget_file=\"/x\"\n\
                 [[route]]\nname = \"a\"\nvalues=[\"w\"]\ntarget_file=\"/y\"",
                "two routes are named a",
            ),
            (
                "[[route]]\nname = \"a\"\nvalues=[\"v\"]",
                "route a has no target",
            ),
            (
                "[[route]]\nname = \"a\"\nvalues=[\"v\"]\ntarget=\"postgresql://h/d\"\ntarget_file=\"/x\"",
                "both target and target_file",
            ),
            (
                "[[route]]\nname = \"a\"\nvalue=[\"v\"]\ntarget_file=\"/x\"",
                "not a valid routes file (line 3): unknown field…",
            ),
            ("route_by = \"\"\n[[route]]\nname=\"a\"", "route_by must not be empty"),
        ];
        for (text, expected) in cases {
            let message = message(parse(text));
            assert!(
                message.contains(expected),
                "{text:?}: {message:?} lacks {expected:?}"
            );
            assert!(message.starts_with("routes.toml: "), "{message}");
        }
        let no_default = Routes::parse(
            "[[route]]\nname = \"a\"\nvalues=[\"v\"]\ntarget_file=\"/x\"",
            "f",
            None,
            |_| unreachable!(),
        );
        assert!(message(no_default).contains("route_by is missing"));
    }

    #[test]
    fn two_routes_into_one_database_are_refused() {
        let text = "[[route]]\nname = \"a\"\nvalues=[\"v\"]\ntarget=\"postgresql://u@h/d\"\n\
                    [[route]]\nname = \"b\"\nvalues=[\"w\"]\ntarget=\"postgresql://v@h:5432/d\"";
        assert!(message(parse(text)).contains("routes a and b write to the same database"));
    }

    #[test]
    fn a_url_in_the_wrong_place_is_never_said_back() {
        for text in [
            // A Debug string escapes only its own quote: the rest of the password follows one.
            "[[route]]\nname = \"a\"\nvalues = \"postgresql://u:ab'cdef@h/d\"\ntarget_file=\"/x\"",
            "[[route]]\nname = \"a\"\nvalues=[\"v\"]\ntarget_file = \"postgresql://u:ab'cdef@h/d\"",
            "[[route]]\nname = \"postgresql://u:ab'cdef@h/d\"\nvalues=[\"v\"]\ntarget_file=\"/x\"",
            "[[route]]\nname = \"a\"\nvalues=[\"postgresql://u:ab'cdef@h/d\"]\ntarget_file=\"/x\"\n\
             [[route]]\nname = \"b\"\nvalues=[\"postgresql://u:ab'cdef@h/d\"]\ntarget_file=\"/y\"",
            "\"postgresql://u:ab'cdef@h/d\" = 1",
        ] {
            let message = message(parse(text));
            assert!(
                !message.contains("cdef") && !message.contains("ab'"),
                "{text:?}: {message}"
            );
        }
    }

    fn column(name: &str, type_oid: u32, is_key: bool) -> RelationColumn {
        RelationColumn {
            is_key,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        }
    }

    #[test]
    fn the_routing_column_must_be_keyed_reliably_typed_and_spelled_as_printed() {
        let table: TableName = "public.ProjectUser".parse().unwrap();
        let routes = |values: &str| {
            parse(&format!(
                "[[route]]\nname = \"a\"\nvalues=[{values}]\ntarget_file=\"/x\""
            ))
            .unwrap()
        };
        let uuid = routes("\"5f8c8b8e-4a37-4a55-9d0c-0c5b1a1f2d3e\"");
        let keyed = [column("id", 2950, true), column("tenancyId", 2950, true)];
        assert_eq!(uuid.column_in(&table, &keyed).unwrap(), 1);
        let not_key = [column("tenancyId", 2950, false)];
        let error = uuid.column_in(&table, &not_key).unwrap_err().to_string();
        assert!(error.contains("REPLICA IDENTITY FULL"), "{error}");
        let missing = [column("id", 2950, true)];
        let error = uuid.column_in(&table, &missing).unwrap_err().to_string();
        assert!(error.contains("does not have"), "{error}");
        let boolean = [column("tenancyId", 16, true)];
        let error = uuid.column_in(&table, &boolean).unwrap_err().to_string();
        assert!(error.contains("cannot match reliably"), "{error}");
        let upper = routes("\"5F8C8B8E-4A37-4A55-9D0C-0C5B1A1F2D3E\"");
        let error = upper.column_in(&table, &keyed).unwrap_err().to_string();
        assert!(
            error.contains("not how PostgreSQL prints a uuid"),
            "{error}"
        );
        let integers = [column("tenancyId", 20, true)];
        assert!(routes("\"42\", \"-7\"")
            .column_in(&table, &integers)
            .is_ok());
        for bad in ["\"042\"", "\"+4\"", "\"4 \""] {
            assert!(routes(bad).column_in(&table, &integers).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_syntax_error_never_quotes_the_file() {
        // The line holds a password; the parser would quote it.
        let text = "[[route]]\nname = \"a\"\nvalues = [\"v\"]\ntarget = \"postgresql://u:hunter2@h/d\" x\n";
        let message = message(parse(text));
        assert!(!message.contains("hunter2"), "{message}");
        assert!(message.contains("line 4"), "{message}");
    }
}
