"""Benchmarks and their scoring: tasks from local files, answer extraction, metrics, tables and charts."""
