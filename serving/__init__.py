"""Serving a rerank request, whatever dialect it came in: the same steps for every route.

- `pipeline`: access check -> tenant limits -> route -> model -> usage ledger; the registry being served
  (`Served`: its pool and route table), trying a route's candidates in turn.
- `routing`: the route table: weighted and sticky splits, fallbacks, a forced variant.
- `shadow`: mirrored requests to a route's shadow model and the per-route report.
- `agreement`: how two rankings of the same documents agree (top-1, overlap@k, Kendall, Spearman).
- `reload`: swapping in a changed registry file without a restart; `registry_watch` polls the file.
"""
