mod cli_core;
mod multi_user;
mod sqlite_store;
mod support;
