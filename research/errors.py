"""The one exception type for bad user input; every module may import it without importing config."""


class ConfigError(ValueError):
    """A bad key or value in a config file, override or argument; the message names it and the fix."""
