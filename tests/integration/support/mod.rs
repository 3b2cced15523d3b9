//! Fixtures shared by the integration tests. Nothing here imports from the test
//! files.

pub mod cli;
pub mod fake_smi;
pub mod fleet;
pub mod history;
pub mod protected;
pub mod redis;
pub mod sqlite;
pub mod web;

use std::any::Any;

use canhazgpu::store::{RedisLayout, Store};

/// The stores every backend-agnostic test runs against: the embedded one, Redis in
/// its default fleet layout, and Redis in upstream canhazgpu's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Sqlite,
    Redis,
    RedisUpstream,
}

/// The backend matrix: `backend_matrix! { name => |backend| body, ... }` expands to
/// `mod sqlite`, `mod redis` and `mod redis_upstream`, each with one `#[test] fn
/// name()` that runs `body` with its `BackendKind`.
macro_rules! backend_matrix {
    ($($test:ident => $body:expr),* $(,)?) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $test() {
                    ($body)($crate::support::BackendKind::Sqlite)
                }
            )*
        }
        mod redis {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $test() {
                    ($body)($crate::support::BackendKind::Redis)
                }
            )*
        }
        mod redis_upstream {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $test() {
                    ($body)($crate::support::BackendKind::RedisUpstream)
                }
            )*
        }
    };
}
pub(crate) use backend_matrix;

/// A CLI environment on `backend`, with the Redis server it needs (kept alive by the
/// second value).
pub fn cli_env(backend: BackendKind) -> (cli::CliEnv, Option<redis::TestRedis>) {
    match backend {
        BackendKind::Sqlite => (cli::CliEnv::sqlite(), None),
        BackendKind::Redis => {
            let server = redis::TestRedis::launch();
            (cli::CliEnv::redis(&server.url()), Some(server))
        }
        BackendKind::RedisUpstream => {
            let server = redis::TestRedis::launch();
            (cli::CliEnv::redis_upstream(&server.url()), Some(server))
        }
    }
}

/// An empty store under test.
pub struct StoreFixture {
    /// Keeps the backend alive for the test (a server process, temporary files).
    #[expect(dead_code, reason = "only held, to be dropped when the test ends")]
    pub guard: Box<dyn Any>,
    /// Opens another, independent connection to the same store.
    pub open: Box<dyn Fn() -> Box<dyn Store> + Send + Sync>,
}

/// A new, empty store on `backend`.
pub fn store_fixture(backend: BackendKind) -> StoreFixture {
    match backend {
        BackendKind::Sqlite => sqlite::sqlite_store_fixture(),
        BackendKind::Redis => redis::redis_store_fixture(RedisLayout::Fleet),
        BackendKind::RedisUpstream => redis::redis_store_fixture(RedisLayout::Upstream),
    }
}

/// Exits with one line (no panic, no backtrace) when a program the tests need is
/// missing: plain `cargo test` on a bare machine says what to do.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    if !found {
        // Straight to the file descriptor: the test harness captures `eprintln!`.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "{program} is not installed: run scripts/test.sh, which installs what the tests need"
        );
        std::process::exit(1);
    }
}
