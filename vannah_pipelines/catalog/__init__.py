"""The catalog: immutable Parquet batch files (the durable record) queried through DuckDB."""
