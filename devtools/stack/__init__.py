"""Local infrastructure processes (broker, InfluxDB) for tests, benchmarks and `make run`."""
