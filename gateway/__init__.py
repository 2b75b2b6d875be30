"""The HTTP edge: the Litestar app (`app`, its composition root), the rerank routes of every dialect
(`rerank_routes`), the error bodies and their OpenAPI description (`http_errors`), strict body decoding
(`strict_json`) and the typed bodies of the gateway's own routes (`schemas`)."""
