"""Structured pruning: plans, importance, the resource model, the UVC search and physical slicing."""
