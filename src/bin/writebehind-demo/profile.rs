//! One user profile of the portal-personalization case: the value type of the cache and the
//! columns of the typed `profiles` table (its key, `user_id`, and `version` are separate).
//!
//! Shared by the load driver and the typed-adapter examples (`examples/profiles_*.rs`).

/// One row of `profiles`, without its key and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Display name.
    pub name: String,
    /// `light` or `dark` (the table's CHECK constraint rejects anything else).
    pub theme: String,
    /// Visit counter, never negative (also a CHECK constraint).
    pub visits: i64,
}
