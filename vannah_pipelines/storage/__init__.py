"""One storage interface for every tier: put, open (stream), stat, delete."""
