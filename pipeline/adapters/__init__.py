"""Kafka, Faust, ClickHouse and Prometheus behind the runner's ports."""

import os

# clickhouse-driver fills a table of every date from 1900 to 2299 when imported (0.3 s of each worker's start-up);
# set before any adapter imports it, the table is filled as dates are met instead.
os.environ.setdefault("CLICKHOUSE_DRIVER_LASY_DATE_LUT", "lazy")
