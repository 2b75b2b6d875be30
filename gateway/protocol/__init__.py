"""One module per API dialect, each mapping its wire format onto gateway.types."""
