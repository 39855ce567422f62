"""JSON Schemas for config tables and their sidecars."""
