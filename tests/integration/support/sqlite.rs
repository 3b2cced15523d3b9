//! An embedded store in a temporary directory, for the conformance suite.

use canhazgpu::store::sqlite::SqliteStore;

use super::StoreFixture;

pub fn sqlite_store_fixture() -> StoreFixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state").join("state.db");
    StoreFixture {
        guard: Box::new(dir),
        open: Box::new(move || Box::new(SqliteStore::open(&path).expect("open sqlite store"))),
    }
}
