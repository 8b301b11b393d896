"""Looking at results: plan tables and heatmaps, which kernels will serve, quality against a bf16 reference."""
