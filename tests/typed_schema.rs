//! The typed-schema adapter example (examples/profiles_sqlite.rs) runs its checks against a
//! real SQLite file, so the documentation example cannot rot.
#![cfg(feature = "sqlite")]

#[path = "../examples/profiles_sqlite.rs"]
mod profiles;

#[test]
fn typed_profiles_adapter_example_holds() {
    let dir = tempfile::tempdir().unwrap();
    profiles::demo(&dir.path().join("profiles.db")).unwrap();
}
