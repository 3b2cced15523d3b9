mod cli_core;
mod gpu_providers;
mod multi_user;
mod sqlite_store;
mod support;
