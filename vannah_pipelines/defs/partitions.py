"""Partitions: landed data is partitioned by arrival day (UTC); batches ride in run config."""

import dagster as dg

landing_days = dg.DailyPartitionsDefinition(start_date="2020-01-01", end_offset=1)
