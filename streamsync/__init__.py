"""streamsync: keep Redis caches in sync with a database through Debezium change data capture."""

__version__ = "0.1.0"
