"""Observation: the metrics and the access log every request feeds (one observation per request)."""
