"""mailward: a policy-enforcing mail filter (milter) for Postfix and Sendmail."""

__version__ = "0.1.0"
