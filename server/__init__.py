"""The serving process around the HTTP app.

- `http_server`: uvicorn's h11 protocol with header and body deadlines, header limits and a connection cap,
  and a shutdown that drains within `server.drain_timeout_s`.
- `lifecycle`: the process's phase (serving, draining, past the drain deadline), read by the app.
"""
