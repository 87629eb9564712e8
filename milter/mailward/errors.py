"""One exception tree for mailward, mixed with the stdlib types callers already catch."""


class MailwardError(Exception):
    """Base of every error mailward raises on purpose."""


class ConfigError(MailwardError, ValueError):
    """The configuration is invalid; the message names file, section, key, value and expectation."""
