"""The operator's commands, outside the serving path: nothing that serves a request imports them.

- `cli`: `rerank-gateway` (serve, check, plan, tune, keys, registry-sync).
- `plan`: GPU memory per model from the registry alone.
- `capacity`: workers per GPU type (or CPU cores) for a traffic shape, from measured profiles.
- `tune`: measures pairs/s and peak memory across token budgets and prints the profile to paste.
- `registry_sync`: the registry file merged from a base and overlays (Kubernetes: a ConfigMap and a Secret).
"""
