"""strata: a Docker graphdriver plugin."""
