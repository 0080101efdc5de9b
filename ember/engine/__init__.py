"""The engine: requests, KV-block bookkeeping, scheduling, and the step loop (sync and async)."""
