"""The operations console: a JSON API and a page over ClickHouse and the dead-letter topic."""
