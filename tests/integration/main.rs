mod sqlite_store;
