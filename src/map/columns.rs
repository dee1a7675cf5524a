//! What every profile does with a relation and its rows: find columns by name once per
//! Relation message, read a row's values by position, and build `raw_json` with the keys
//! whose source value is unchanged TOAST set aside for apply.
//!
//! Binding also records what the mapping does with each column ([`ColumnUse`]): a column the
//! profile looked up is read, one passed through is copied, and the replica identity is
//! needed whatever the profile does. That record is what a publication's column list must
//! carry, so it is kept by the one place every lookup goes through ([`Relation`]) rather than
//! listed by hand in each profile, where a column read but forgotten would vanish from the
//! stream.

use std::cell::Cell;

use serde_json::Value;

use super::selection::{ColumnSelection, EXCLUDE_OPTION, INCLUDE_OPTION};
use super::value::{self, TextValue, ValueError};
use super::{MapError, MappedUser, Member, RawJson};
use crate::decode::{ColumnValue, RelationColumn, TupleData};

/// What `MapError::Column` says a passed-through column was becoming.
pub(super) const PASSTHROUGH_TARGET: &str = "a JSON value";

/// Whether a column name says it holds a credential: a password or its hash, a token, a
/// secret, a key, a one-time or recovery code, a session. The profiles never copy such a
/// column into `raw_json` (nor, through the publication's column list, over the wire), whatever
/// the store adds in a later version; `--include-columns` brings one back by name.
///
/// The name matches when any of these holds (case-insensitive):
///
/// - it contains `password`, `token` or `secret` anywhere ([`CREDENTIAL_SUBSTRINGS`]). These
///   three are matched as substrings because stores glue them to other words
///   (`encrypted_password`, `resetpasswordtoken`, `totpsecret`) and few innocent words contain
///   them (`tokenizer_version` does: an accepted false positive);
/// - one of its segments is a credential word ([`CREDENTIAL_SEGMENTS`]: `pass`, `pwd`, `hash`,
///   `digest`, `salt`, `credential`, `session`, `pin`, …). The name is split into lowercase
///   segments on `_`, `-`, `.`, spaces and camelCase boundaries ([`name_segments`]:
///   `userPass` is `user`, `pass`; `APIKey` is `api`, `key`). Whole segments, not substrings,
///   because these words are short and hide inside innocent ones: `passport`, `compass`,
///   `bypass`, `hashtag`, `pinned`. Plurals match only where listed (`credentials`), so
///   `sessions_count` is not a credential but `session_count` is;
/// - two adjacent segments form a credential pair ([`CREDENTIAL_PAIRS`]: `api key`,
///   `activation key`, `recovery codes`, `security stamp`, …), where neither word alone says
///   credential (`user_key`, `public_key`, `ConcurrencyStamp` are not);
/// - a second factor's name (`otp`, `totp`, `hotp`, `mfa`, `2fa`) is the whole name, or is
///   followed by what holds its secret ([`FACTOR_MATERIAL`]: `otp_code`, `totp_seed`). Alone in
///   a longer name it is a flag or a time (`requiresTotpMfa`, Stack Auth's, `mfa_enabled`,
///   `otp_required_for_login`), which profiles copy.
pub(super) fn is_credential(name: &str) -> bool {
    let lowercase = name.to_ascii_lowercase();
    if CREDENTIAL_SUBSTRINGS
        .iter()
        .any(|word| lowercase.contains(word))
    {
        return true;
    }
    let segments = name_segments(name);
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    if let [only] = segments.as_slice() {
        if SECOND_FACTORS.contains(only) {
            return true;
        }
    }
    segments
        .iter()
        .any(|segment| CREDENTIAL_SEGMENTS.contains(segment))
        || segments.windows(2).any(|pair| match *pair {
            [first, second] => {
                CREDENTIAL_PAIRS.contains(&(first, second))
                    || (SECOND_FACTORS.contains(&first) && FACTOR_MATERIAL.contains(&second))
            }
            _ => false,
        })
}

/// Matched anywhere in a name (see [`is_credential`]).
const CREDENTIAL_SUBSTRINGS: [&str; 3] = ["password", "token", "secret"];

/// Matched as a whole segment (see [`is_credential`]).
const CREDENTIAL_SEGMENTS: [&str; 21] = [
    "pass",
    "passwd",
    "pwd",
    "pw",
    "passcode",
    "passphrase",
    "passkey",
    "hash",
    "hashed",
    "digest",
    "salt",
    "credential",
    "credentials",
    "session",
    "cookie",
    "jwt",
    "bearer",
    "pin",
    "apikey",
    "authkey",
    "privatekey",
];

/// Matched as two adjacent segments (see [`is_credential`]).
const CREDENTIAL_PAIRS: [(&str, &str); 22] = [
    ("api", "key"),
    ("private", "key"),
    ("auth", "key"),
    ("activation", "key"),
    ("access", "key"),
    ("signing", "key"),
    ("encryption", "key"),
    ("recovery", "key"),
    ("master", "key"),
    ("security", "stamp"),
    ("security", "answer"),
    ("recovery", "code"),
    ("recovery", "codes"),
    ("backup", "code"),
    ("backup", "codes"),
    ("reset", "code"),
    ("verification", "code"),
    ("confirmation", "code"),
    ("activation", "code"),
    ("auth", "code"),
    ("login", "code"),
    ("one", "time"),
];

/// A second factor's name: a credential alone, or followed by [`FACTOR_MATERIAL`].
const SECOND_FACTORS: [&str; 5] = ["otp", "totp", "hotp", "mfa", "2fa"];

/// What holds a second factor's secret, after its name (`otp_code`, `totp_seed`).
const FACTOR_MATERIAL: [&str; 8] = [
    "code", "codes", "key", "seed", "uri", "url", "data", "value",
];

/// A column name's lowercase segments: split on `_`, `-`, `.` and whitespace, and where the
/// case says a word starts: `userPass` (a lowercase letter or digit, then an uppercase one)
/// and `APIKey` (an uppercase letter followed by a lowercase one, after uppercase ones).
/// Digits stay with their word (`2fa`, `user2fa`).
pub(super) fn name_segments(name: &str) -> Vec<String> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let mut previous: Option<char> = None;
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '_' || c == '-' || c == '.' || c.is_whitespace() {
            if !current.is_empty() {
                segments.push(std::mem::take(&mut current));
            }
            previous = None;
            continue;
        }
        if let (true, Some(previous)) = (c.is_uppercase(), previous) {
            let next_is_lower = chars.peek().is_some_and(|next| next.is_lowercase());
            if previous.is_lowercase()
                || previous.is_ascii_digit()
                || (previous.is_uppercase() && next_is_lower)
            {
                segments.push(std::mem::take(&mut current));
            }
        }
        current.extend(c.to_lowercase());
        previous = Some(c);
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

/// A source column at a known position of the current relation.
#[derive(Debug, Clone)]
pub(super) struct BoundColumn {
    pub index: usize,
    /// The source column name, which is also the raw_json key when passed through.
    pub name: String,
    pub type_oid: u32,
}

impl BoundColumn {
    pub fn new(index: usize, column: &RelationColumn) -> Self {
        BoundColumn {
            index,
            name: column.name.clone(),
            type_oid: column.type_oid,
        }
    }

    pub fn error(&self, target: &'static str, source: ValueError) -> MapError {
        MapError::Column {
            column: self.name.clone(),
            type_oid: self.type_oid,
            target,
            source,
        }
    }

    /// `values` has been checked against the relation's width; a miss still errors, not panics.
    pub fn value<'r>(
        &self,
        values: &'r [ColumnValue],
        target: &'static str,
    ) -> Result<TextValue<'r>, MapError> {
        let value = values.get(self.index).ok_or(MapError::ColumnCount {
            expected: self.index + 1,
            actual: values.len(),
        })?;
        TextValue::of(value).map_err(|source| self.error(target, source))
    }

    /// The value as a JSON string (whatever its type); `None` when it is unchanged TOAST.
    pub fn string(
        &self,
        values: &[ColumnValue],
        target: &'static str,
    ) -> Result<Option<Value>, MapError> {
        Ok(match self.value(values, target)? {
            TextValue::Text(text) => Some(Value::String(text.to_owned())),
            TextValue::Null => Some(Value::Null),
            TextValue::UnchangedToast => None,
        })
    }

    /// The value as JSON by its type; `None` when it is unchanged TOAST.
    pub fn json(
        &self,
        values: &[ColumnValue],
        target: &'static str,
    ) -> Result<Option<Value>, MapError> {
        Ok(match self.value(values, target)? {
            TextValue::Text(text) => Some(
                value::text_to_json(self.type_oid, text)
                    .map_err(|source| self.error(target, source))?,
            ),
            TextValue::Null => Some(Value::Null),
            TextValue::UnchangedToast => None,
        })
    }

    /// [`BoundColumn::json`] as a `raw_json` member: a `jsonb` value keeps its text (see
    /// [`Member`]). Not a `json` value: `json` checks only syntax, and may hold what `jsonb`
    /// (so the target) refuses, a lone surrogate or a number beyond `numeric`, which the
    /// conversion keeps as a string.
    pub fn member(
        &self,
        values: &[ColumnValue],
        target: &'static str,
    ) -> Result<Option<Member>, MapError> {
        if self.type_oid == value::oid::JSONB {
            if let TextValue::Text(text) = self.value(values, target)? {
                if let Some(member) = Member::json_text(text) {
                    return Ok(Some(member));
                }
            }
        }
        Ok(self.json(values, target)?.map(Member::Value))
    }

    /// A value that decides whether the row is replicated at all. Such columns are small
    /// (booleans, timestamps, short ids) and never stored out of line, so unchanged TOAST here
    /// means something we do not understand: an error rather than a guess.
    pub fn filter_value<'r>(
        &self,
        values: &'r [ColumnValue],
        target: &'static str,
    ) -> Result<Option<&'r str>, MapError> {
        match self.value(values, target)? {
            TextValue::Text(text) => Ok(Some(text)),
            TextValue::Null => Ok(None),
            TextValue::UnchangedToast => Err(MapError::UnchangedToastFilter {
                column: self.name.clone(),
            }),
        }
    }

    /// The user id's text: never NULL, never unchanged TOAST.
    pub fn id_text<'r>(&self, values: &'r [ColumnValue]) -> Result<&'r str, MapError> {
        match self.value(values, super::key::ID)? {
            TextValue::Text(text) => Ok(text),
            TextValue::Null => Err(MapError::NullId {
                column: self.name.clone(),
            }),
            TextValue::UnchangedToast => Err(MapError::UnchangedToastId {
                column: self.name.clone(),
            }),
        }
    }
}

/// A column of the relation that the mapping uses, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedColumn {
    pub name: String,
    /// Read into a key, or to decide which rows are users.
    pub read: bool,
    /// Copied into `raw_json` under its own name.
    pub copied: bool,
    /// In the replica identity: deletes and updates are matched by it, and PostgreSQL refuses
    /// writes to the table while a publication's column list leaves it out.
    pub in_identity: bool,
}

impl UsedColumn {
    /// Rows cannot be mapped (or the table written) without it.
    pub fn needed(&self) -> bool {
        self.read || self.in_identity
    }
}

/// The relation's columns the mapping uses, in the relation's order: what a publication's
/// column list must carry. The others may be left out of the stream altogether.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnUse {
    pub columns: Vec<UsedColumn>,
}

impl ColumnUse {
    /// Every column used, needed or copied.
    pub fn names(&self) -> Vec<String> {
        self.columns
            .iter()
            .map(|column| column.name.clone())
            .collect()
    }

    /// The columns rows cannot be mapped without.
    pub fn needed(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter(|column| column.needed())
            .map(|column| column.name.clone())
            .collect()
    }
}

/// What every bound profile needs to read any row of its relation: how wide rows are, and
/// which column holds the user id; and, for the publication, which columns it uses.
#[derive(Debug, Clone)]
pub struct RowLayout {
    pub(super) column_count: usize,
    pub(super) id: BoundColumn,
    pub(super) used: ColumnUse,
}

impl RowLayout {
    /// The columns the mapping uses: what the publication's column list must carry.
    pub fn used(&self) -> &ColumnUse {
        &self.used
    }

    /// The source column a user's id is read from.
    pub fn id_column(&self) -> &str {
        &self.id.name
    }

    /// A row's values, after checking that the row is as wide as the relation it was bound
    /// to.
    pub(super) fn values<'r>(&self, row: &'r TupleData) -> Result<&'r [ColumnValue], MapError> {
        if row.0.len() == self.column_count {
            Ok(&row.0)
        } else {
            Err(MapError::ColumnCount {
                expected: self.column_count,
                actual: row.0.len(),
            })
        }
    }

    /// The user id of checked values: never NULL, never unchanged TOAST.
    pub(super) fn id<'r>(&self, values: &'r [ColumnValue]) -> Result<&'r str, MapError> {
        self.id.id_text(values)
    }
}

/// The columns a named profile does not read into a key of its own: each passes through
/// under its own name, or is left out.
#[derive(Debug, Clone)]
pub(super) struct OtherColumns {
    pub passthrough: Vec<BoundColumn>,
    pub excluded: Vec<String>,
}

impl OtherColumns {
    /// Sorts the columns other than `read` (those the profile moves into its keys), after
    /// every other lookup of the profile (a column looked up cannot be excluded). A column
    /// the profile never copies (credentials and the like) is left out silently, unless
    /// `selection` includes it by name; one named like a key in `computed` is left out with a
    /// note, since passing it through would overwrite the key the profile computes; then
    /// `selection` has its say (see the `selection` module). The columns passed through are
    /// recorded as copied in `relation`.
    pub fn bind(
        relation: &Relation<'_>,
        read: &[&BoundColumn],
        never_copied: impl Fn(&str) -> bool,
        computed: &[&str],
        selection: &ColumnSelection,
        notes: &mut Vec<String>,
    ) -> Result<Self, MapError> {
        if let ColumnSelection::Exclude(names) = selection {
            if let Some(name) = names.iter().find(|name| relation.is_read(name)) {
                return Err(MapError::ExcludedColumnRead {
                    column: name.clone(),
                });
            }
        }
        let mut passthrough = Vec::new();
        let mut excluded = Vec::new();
        for (index, column) in relation.columns.iter().enumerate() {
            if read.iter().any(|read| read.index == index) {
                continue;
            }
            let name = &column.name;
            let credential = never_copied(name);
            if computed.contains(&name.as_str()) {
                if selection.includes(name) {
                    return Err(MapError::IncludedComputedKey {
                        column: name.clone(),
                    });
                }
                notes.push(format!(
                    "column {name} is left out of raw_json: the profile computes that key"
                ));
                excluded.push(format!("{name} (named like a computed key)"));
            } else if selection.includes(name) {
                if credential {
                    notes.push(format!(
                        "column {name} is copied into raw_json although its name says \
                         credential: --include-columns names it"
                    ));
                }
                passthrough.push(BoundColumn::new(index, column));
            } else if credential {
                excluded.push(name.clone());
            } else if let ColumnSelection::Include(_) = selection {
                excluded.push(format!("{name} (not in {INCLUDE_OPTION})"));
            } else if selection.excludes(name) {
                excluded.push(format!("{name} ({EXCLUDE_OPTION})"));
            } else {
                passthrough.push(BoundColumn::new(index, column));
            }
        }
        for column in &passthrough {
            if let Some(copied) = relation.copied.get(column.index) {
                copied.set(true);
            }
        }
        Ok(OtherColumns {
            passthrough,
            excluded,
        })
    }

    /// The passed-through column names, as [`MappingPlan`](super::MappingPlan) lists them.
    pub fn passthrough_names(&self) -> Vec<String> {
        self.passthrough
            .iter()
            .map(|column| column.name.clone())
            .collect()
    }
}

/// The relation's columns with the lookups binding needs, recording which columns the
/// profile reads (every column a lookup returns) and copies ([`OtherColumns::bind`]).
pub(super) struct Relation<'c> {
    pub columns: &'c [RelationColumn],
    read: Vec<Cell<bool>>,
    copied: Vec<Cell<bool>>,
}

impl<'c> Relation<'c> {
    pub fn new(columns: &'c [RelationColumn]) -> Self {
        Relation {
            columns,
            read: vec![Cell::new(false); columns.len()],
            copied: vec![Cell::new(false); columns.len()],
        }
    }

    /// A column by name, without recording it as read: for candidates that may be turned
    /// down.
    fn lookup(&self, name: &str) -> Option<BoundColumn> {
        self.columns
            .iter()
            .position(|column| column.name == name)
            .and_then(|index| Some(BoundColumn::new(index, self.columns.get(index)?)))
    }

    fn mark_read(&self, column: BoundColumn) -> BoundColumn {
        if let Some(read) = self.read.get(column.index) {
            read.set(true);
        }
        column
    }

    /// Whether a lookup returned the column named `name`.
    fn is_read(&self, name: &str) -> bool {
        self.lookup(name)
            .and_then(|column| self.read.get(column.index))
            .is_some_and(Cell::get)
    }

    /// The column named `name`, which the profile reads.
    pub fn find(&self, name: &str) -> Option<BoundColumn> {
        self.lookup(name).map(|column| self.mark_read(column))
    }

    pub fn first_of(&self, names: &[&str]) -> Option<BoundColumn> {
        names.iter().find_map(|name| self.find(name))
    }

    /// The layout of the bound relation, once every lookup is done; `id` is the user id.
    pub fn layout(&self, id: BoundColumn) -> RowLayout {
        let columns = self
            .columns
            .iter()
            .enumerate()
            .filter_map(|(index, column)| {
                let read = self.read.get(index).is_some_and(Cell::get);
                let copied = self.copied.get(index).is_some_and(Cell::get);
                (read || copied || column.is_key).then(|| UsedColumn {
                    name: column.name.clone(),
                    read,
                    copied,
                    in_identity: column.is_key,
                })
            })
            .collect();
        RowLayout {
            column_count: self.columns.len(),
            id,
            used: ColumnUse { columns },
        }
    }

    /// Like `first_of`, skipping (with a note) candidates whose type cannot feed `key`.
    pub fn first_of_type(
        &self,
        names: &[&str],
        types: &[u32],
        (key, wrong_type): (&str, ValueError),
        notes: &mut Vec<String>,
    ) -> Option<BoundColumn> {
        names
            .iter()
            .filter_map(|name| self.lookup(name))
            .find(|column| {
                let fits = types.contains(&column.type_oid);
                if !fits {
                    notes.push(format!(
                        "column {} (type oid {}) is not used for {key}: {wrong_type}",
                        column.name, column.type_oid
                    ));
                }
                fits
            })
            .map(|column| self.mark_read(column))
    }

    pub fn names(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        names.join(", ")
    }

    pub fn is_key(&self, column: &BoundColumn) -> bool {
        self.columns
            .get(column.index)
            .is_some_and(|column| column.is_key)
    }

    /// A column a named profile cannot work without: the first of `names` present (stores
    /// spell some columns two ways), of one of `types` when given.
    pub fn require(&self, need: &ColumnNeed) -> Result<BoundColumn, MapError> {
        self.optional(need)?
            .ok_or_else(|| MapError::ProfileColumnMissing {
                profile: need.profile,
                column: need.names.join(" or "),
                available: self.names(),
            })
    }

    /// A column a named profile uses when present (older versions of the store lack it);
    /// present with the wrong type is still an error.
    pub fn optional(&self, need: &ColumnNeed) -> Result<Option<BoundColumn>, MapError> {
        let Some(column) = self.first_of(need.names) else {
            return Ok(None);
        };
        match need.types {
            Some((types, expected)) if !types.contains(&column.type_oid) => {
                Err(MapError::ProfileColumnType {
                    profile: need.profile,
                    column: column.name,
                    type_oid: column.type_oid,
                    expected,
                })
            }
            _ => Ok(Some(column)),
        }
    }

    /// The id column: it must be in the replica identity, or deletes could not be matched to
    /// users.
    pub fn require_id(&self, need: &ColumnNeed) -> Result<BoundColumn, MapError> {
        let id = self.require(need)?;
        if self.is_key(&id) {
            Ok(id)
        } else {
            Err(MapError::IdNotInReplicaIdentity { column: id.name })
        }
    }
}

/// A column a named profile reads, as its store's published schema spells it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ColumnNeed {
    pub profile: &'static str,
    /// Accepted spellings, preferred first.
    pub names: &'static [&'static str],
    /// Accepted types, and how to say so in an error; `None` takes any type.
    pub types: Option<(&'static [u32], &'static str)>,
}

impl ColumnNeed {
    /// A column of any type, by one of `names`.
    pub const fn named(profile: &'static str, names: &'static [&'static str]) -> Self {
        ColumnNeed {
            profile,
            names,
            types: None,
        }
    }

    /// A column of one of `types` (with how to say so in an error), by one of `names`.
    pub const fn typed(
        profile: &'static str,
        names: &'static [&'static str],
        types: (&'static [u32], &'static str),
    ) -> Self {
        ColumnNeed {
            profile,
            names,
            types: Some(types),
        }
    }
}

/// `raw_json` being built. A key whose source value is unchanged TOAST is left out and set
/// aside for apply, which keeps the target's current value.
#[derive(Debug)]
pub(super) struct UserJson {
    raw_json: RawJson,
    unchanged_keys: Vec<String>,
}

impl UserJson {
    pub fn new(id: &str) -> Self {
        let mut raw_json = RawJson::new();
        raw_json.insert(super::key::ID.to_owned(), Value::String(id.to_owned()));
        UserJson {
            raw_json,
            unchanged_keys: Vec::new(),
        }
    }

    /// `None`: the source did not send the value (unchanged TOAST).
    pub fn set(&mut self, key: &str, value: Option<Value>) {
        self.set_member(key, value.map(Member::Value));
    }

    /// [`UserJson::set`] for a member that may be JSON text.
    pub fn set_member(&mut self, key: &str, member: Option<Member>) {
        match member {
            Some(member) => {
                self.raw_json.insert(key.to_owned(), member);
            }
            None => self.unchanged_keys.push(key.to_owned()),
        }
    }

    /// `key` from a column read as a string, whatever its type.
    pub fn set_string(
        &mut self,
        key: &'static str,
        column: &BoundColumn,
        values: &[ColumnValue],
    ) -> Result<(), MapError> {
        let value = column.string(values, key)?;
        self.set(key, value);
        Ok(())
    }

    /// Copies each column under its own name with its JSON value.
    pub fn pass_through(
        &mut self,
        columns: &[BoundColumn],
        values: &[ColumnValue],
    ) -> Result<(), MapError> {
        for column in columns {
            let member = column.member(values, PASSTHROUGH_TARGET)?;
            self.set_member(&column.name, member);
        }
        Ok(())
    }

    /// `signed_up_at_millis` from a time or integer-milliseconds column; left out when NULL,
    /// so the target's `created_at` is NULL (see the module docs of `map`).
    pub fn set_signed_up_at(
        &mut self,
        column: &BoundColumn,
        values: &[ColumnValue],
    ) -> Result<(), MapError> {
        let key = super::key::SIGNED_UP_AT_MILLIS;
        match column.value(values, key)? {
            TextValue::Text(text) => {
                let millis = value::millis_from_text(column.type_oid, text)
                    .map_err(|source| column.error(key, source))?;
                self.set(key, Some(Value::from(millis)));
            }
            TextValue::Null => {}
            TextValue::UnchangedToast => self.set(key, None),
        }
        Ok(())
    }

    /// `primary_email_verified` from a flag or a verification time; NULL is false.
    pub fn set_email_verified(
        &mut self,
        column: &BoundColumn,
        values: &[ColumnValue],
    ) -> Result<(), MapError> {
        let key = super::key::PRIMARY_EMAIL_VERIFIED;
        let verified = match column.value(values, key)? {
            TextValue::Text(text) => Some(Value::Bool(
                value::verified_from_text(column.type_oid, text)
                    .map_err(|source| column.error(key, source))?,
            )),
            TextValue::Null => Some(Value::Bool(false)),
            TextValue::UnchangedToast => None,
        };
        self.set(key, verified);
        Ok(())
    }

    pub fn finish(self, id: String) -> MappedUser {
        MappedUser {
            id,
            raw_json: self.raw_json,
            unchanged_keys: self.unchanged_keys,
        }
    }
}

/// Relations and rows for the profiles' unit tests.
#[cfg(test)]
pub(super) mod fixtures {
    use bytes::Bytes;

    use crate::decode::{ColumnValue, RelationColumn, TupleData};
    use crate::map::{MappedUser, RowOutcome};

    pub fn column(name: &str, type_oid: u32, is_key: bool) -> RelationColumn {
        RelationColumn {
            is_key,
            name: name.to_owned(),
            type_oid,
            type_modifier: -1,
        }
    }

    pub fn text(value: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(value.as_bytes()))
    }

    pub fn row(values: Vec<ColumnValue>) -> TupleData {
        TupleData(values)
    }

    /// A row built by column name; columns not given are NULL.
    pub fn row_of(columns: &[RelationColumn], given: &[(&str, ColumnValue)]) -> TupleData {
        let values = columns
            .iter()
            .map(|column| {
                given
                    .iter()
                    .find(|(name, _)| *name == column.name)
                    .map_or(ColumnValue::Null, |(_, value)| value.clone())
            })
            .collect();
        TupleData(values)
    }

    /// A relation from `(name, type oid)` pairs, in order; `key` names its replica identity.
    pub fn relation(columns: &[(&str, u32)], key: &[&str]) -> Vec<RelationColumn> {
        columns
            .iter()
            .map(|&(name, type_oid)| column(name, type_oid, key.contains(&name)))
            .collect()
    }

    /// A row built by column name from a profile's typical row, `base`, with `changes` in
    /// place of (or beside) its values.
    pub fn row_changing(
        columns: &[RelationColumn],
        base: &[(&str, ColumnValue)],
        changes: &[(&str, ColumnValue)],
    ) -> TupleData {
        let given: Vec<_> = changes.iter().chain(base).cloned().collect();
        row_of(columns, &given)
    }

    /// The user of a live-user outcome; any other outcome fails the test.
    pub fn live_user(outcome: RowOutcome) -> MappedUser {
        match outcome {
            RowOutcome::User(user) => user,
            other => panic!("expected a live user, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_columns_are_recognised_by_name() {
        for name in [
            // The substring rule: the three words, glued or not.
            "encrypted_password",
            "resetpasswordtoken",
            "recovery_token",
            "email_change_token_new",
            "totp_secret",
            "totpSecret",
            "passwordHash",
            "PasswordHash",
            "password_digest",
            "password_reset_token",
            "refreshToken",
            "refresh_token",
            "access_token",
            "id_token",
            "confirmation_token",
            "unlock_token",
            "two_factor_secret",
            "encrypted_otp_secret",
            "otp_secret_key",
            "mfa_secret",
            // WordPress, Drupal.
            "user_pass",
            "user_activation_key",
            "pass",
            // Laravel Fortify, Devise/GitLab/Mastodon.
            "two_factor_recovery_codes",
            "otp_backup_codes",
            // Yii2.
            "auth_key",
            // Rails tutorial.
            "remember_digest",
            "reset_digest",
            "activation_digest",
            // ASP.NET Identity.
            "SecurityStamp",
            "security_stamp",
            // Common spellings.
            "salt",
            "passwd",
            "pwd",
            "hashed_pw",
            "pw_hash",
            "api_key",
            "apiKey",
            "APIKey",
            "apikey",
            "private_key",
            "privateKey",
            "credentials",
            "credential_id",
            "session_id",
            "sessionId",
            "totp",
            "hotp",
            "mfa",
            "otp_code",
            "totp_seed",
            "mfaRecoveryCodes",
            "reset_code",
            "verification_code",
            "recovery_code",
            "recovery_codes",
            "backup_code",
            "backup_codes",
            "one_time_code",
            "pin",
            "jwt",
            "remember-cookie",
            "user.pass",
            "user pass",
            "userPass",
        ] {
            assert!(is_credential(name), "{name} should be a credential");
        }
        for name in [
            // Columns the profiles read or pass through (src/map/*.rs and their tests).
            "id",
            "email",
            "display_name",
            "displayName",
            "name",
            "created_at",
            "createdAt",
            "updated_at",
            "updatedAt",
            "deleted_at",
            "email_confirmed_at",
            "email_verified",
            "emailVerified",
            "confirmed_at",
            "last_sign_in_at",
            "raw_user_meta_data",
            "raw_app_meta_data",
            "is_anonymous",
            "isAnonymous",
            "is_sso_user",
            "is_super_admin",
            "banned_until",
            "phone",
            "phone_confirmed_at",
            "instance_id",
            "aud",
            "role",
            "realm_id",
            "username",
            "first_name",
            "last_name",
            "enabled",
            "federation_link",
            "service_account_client_link",
            "created_timestamp",
            "not_before",
            "tenancyId",
            "projectUserId",
            "mirroredProjectId",
            "mirroredBranchId",
            "serverMetadata",
            "clientMetadata",
            "clientReadOnlyMetadata",
            "profileImageUrl",
            "requiresTotpMfa",
            "isPrimary",
            "usedForAuth",
            "isVerified",
            "value",
            "type",
            "image",
            "banned",
            "banReason",
            "banExpires",
            "twoFactorEnabled",
            "metadata",
            "version",
            "user_key",
            "login_count",
            // Innocents that look close: segments are whole words.
            "passport_country",
            "compass",
            "bypass_sso",
            "hashtag",
            "pinned",
            "sessions_count",
            "otp_required_for_login",
            "mfa_enabled",
            "ConcurrencyStamp",
            "public_key",
            "nonce",
            "keyboard_layout",
            "avatar_url",
        ] {
            assert!(!is_credential(name), "{name} should not be a credential");
        }
    }

    /// Names that look like a credential but are not: the price of the rule, which
    /// `--include-columns` pays back.
    #[test]
    fn accepted_false_positives() {
        for name in [
            "tokenizer_version",
            "password_changed_at",
            "session_count",
            "email_hash",
            "pin_set_at",
        ] {
            assert!(is_credential(name), "{name}");
        }
    }

    #[test]
    fn names_split_into_lowercase_segments() {
        for (name, segments) in [
            ("userPass", &["user", "pass"][..]),
            ("PasswordHash", &["password", "hash"]),
            ("APIKey", &["api", "key"]),
            ("user_activation_key", &["user", "activation", "key"]),
            (
                "two-factor.recovery codes",
                &["two", "factor", "recovery", "codes"],
            ),
            ("requiresTotpMfa", &["requires", "totp", "mfa"]),
            ("user2faCode", &["user2fa", "code"]),
            ("__id__", &["id"]),
            ("", &[]),
        ] {
            assert_eq!(name_segments(name), segments, "{name}");
        }
    }
}
