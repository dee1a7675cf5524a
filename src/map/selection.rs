//! Which source columns go into `raw_json` under their own names, besides the keys a profile
//! computes: the profile's rule, or the operator's allow-list or deny-list.
//!
//! **The profile's rule.** Every profile copies the columns it does not read into a key,
//! except those it never copies: any column whose name says it holds a credential
//! (`password`, `token` or `secret` in it, or a credential word such as `pass`, `hash`,
//! `salt`, `api_key`: `columns::is_credential`) and the profile's own
//! (Supabase's verification-flow state, Keycloak's `email_constraint`).
//!
//! **`--include-columns a,b`** (allow-list): besides the keys, only `a` and `b` are copied.
//! A column named there is copied even when its name looks like a credential
//! (`password_changed_at`): the operator named it, and nothing else could bring it in. A
//! column named like a key the profile computes cannot be included (it would overwrite it).
//!
//! **`--exclude-columns a,b`** (deny-list): the profile's rule, and `a` and `b` are not copied
//! either. A column the profile reads (the id, the email, what decides which rows are users)
//! cannot be excluded: its value reaches `raw_json` (or decides a row) whatever the list says,
//! so the list would promise what it cannot keep.
//!
//! Not both: an allow-list already leaves everything else out. Names are matched exactly, as
//! the catalog spells them (`"totpSecret"`), and must be columns of the users table (checked
//! against the catalog when `setup` and `run` start, since a publication's column list hides
//! the columns it leaves out from the stream). A column left out is also left out of the
//! publication's column list (PostgreSQL 15+) unless it is in the replica identity.

use super::MapError;
use crate::decode::RelationColumn;

/// The option that gives an allow-list.
pub const INCLUDE_OPTION: &str = "--include-columns";
/// The option that gives a deny-list.
pub const EXCLUDE_OPTION: &str = "--exclude-columns";

/// Which of a table's other columns are copied into `raw_json` (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ColumnSelection {
    /// The profile's rule: everything but credentials and the profile's own exclusions.
    #[default]
    Profile,
    /// Only these, besides the keys.
    Include(Vec<String>),
    /// The profile's rule, and not these.
    Exclude(Vec<String>),
}

impl ColumnSelection {
    /// The option that set it, and the names it lists; `None` for the profile's rule.
    pub fn option(&self) -> Option<(&'static str, &[String])> {
        match self {
            ColumnSelection::Profile => None,
            ColumnSelection::Include(names) => Some((INCLUDE_OPTION, names)),
            ColumnSelection::Exclude(names) => Some((EXCLUDE_OPTION, names)),
        }
    }

    /// Whether `name` is on the allow-list.
    pub fn includes(&self, name: &str) -> bool {
        matches!(self, ColumnSelection::Include(names) if names.iter().any(|n| n == name))
    }

    /// Whether `name` is on the deny-list.
    pub fn excludes(&self, name: &str) -> bool {
        matches!(self, ColumnSelection::Exclude(names) if names.iter().any(|n| n == name))
    }

    /// Refuses names that are not columns of the table. `columns` must be the table's own
    /// (from the catalog), not a Relation message's, which a column list narrows.
    pub fn check_names(&self, columns: &[RelationColumn]) -> Result<(), MapError> {
        let Some((option, names)) = self.option() else {
            return Ok(());
        };
        let unknown: Vec<&str> = names
            .iter()
            .filter(|name| !columns.iter().any(|column| &column.name == *name))
            .map(String::as_str)
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(MapError::UnknownSelectedColumns {
            option,
            columns: unknown.join(", "),
            available: columns
                .iter()
                .map(|column| column.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// One line for `setup`'s printout; `None` for the profile's rule.
    pub fn describe(&self) -> Option<String> {
        match self {
            ColumnSelection::Profile => None,
            ColumnSelection::Include(names) => Some(format!(
                "only these columns are copied besides the keys ({INCLUDE_OPTION}): {}",
                names.join(", ")
            )),
            ColumnSelection::Exclude(names) => Some(format!(
                "not copied, on top of the profile's rule ({EXCLUDE_OPTION}): {}",
                names.join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::columns::fixtures::column;
    use crate::map::value::oid;

    #[test]
    fn names_must_be_columns_of_the_table() {
        let columns = vec![
            column("id", oid::TEXT, true),
            column("email", oid::TEXT, false),
        ];
        assert_eq!(ColumnSelection::Profile.check_names(&columns), Ok(()));
        let known = ColumnSelection::Exclude(vec!["email".into()]);
        assert_eq!(known.check_names(&columns), Ok(()));
        let error = ColumnSelection::Include(vec!["mail".into(), "email".into(), "ssn".into()])
            .check_names(&columns)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "--include-columns names mail, ssn, which the table does not have \
             (its columns: id, email); names are matched exactly, as the catalog spells them"
        );
    }

    #[test]
    fn lists_are_matched_exactly() {
        let include = ColumnSelection::Include(vec!["Plan".into()]);
        assert!(include.includes("Plan") && !include.includes("plan"));
        assert!(!include.excludes("Plan"));
        let exclude = ColumnSelection::Exclude(vec!["plan".into()]);
        assert!(exclude.excludes("plan") && !exclude.includes("plan"));
        assert!(!ColumnSelection::Profile.includes("plan"));
    }
}
