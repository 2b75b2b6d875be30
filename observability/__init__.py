"""What the gateway tells its operators.

- `metrics`: the Prometheus series (one registry per app).
- `logs`: structured logs (text or JSON lines), the request id carried through a request's log lines and
  onto the calls it makes, and the access line.
"""
