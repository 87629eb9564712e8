"""Services the checks use: DNS, rate store, keys, metrics, sd_notify, watchdog."""
