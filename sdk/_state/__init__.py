"""State on this machine: LORABURST_HOME, the SQLite ledger, and local disk I/O."""
