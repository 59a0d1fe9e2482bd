"""Routing: which stored instances go where (rules, their evaluation, their source file)."""
