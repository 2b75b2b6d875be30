"""Who is calling and what they may spend.

- `caller`: `Caller`, who is asking (tenant, fair-share weight, the model names they may use).
- `auth`: API key -> Caller (sha256 hashes, constant-time), model access, the admin key.
- `limits`: per-tenant requests per minute, search units per day and concurrency, in memory or in Redis.
- `usage`: the usage ledger (SQLite): a request is acknowledged only once its row is committed.
"""
