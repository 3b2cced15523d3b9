//! The integration tests, in one binary.

mod redis_store;
mod store_conformance;
mod support;
