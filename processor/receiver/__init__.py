"""Receivers: take OTLP requests, decode them into columnar batches, hand them over."""
