"""The one exception type for mistakes a user can make (bad config, file, flag), and the
warning type for what still works but is worth a line."""


class SubLLMError(ValueError):
    """A user-facing error: the message says what is wrong and how to fix it.

    The CLI prints it as one line and exits non-zero; library callers can catch it.
    """


class ConfigError(SubLLMError):
    """An invalid model or training configuration."""


class SubLLMWarning(UserWarning):
    """Something works but the user should know (a retired setting ignored): the CLI prints
    it as one line, `subllm VERB: warning: ...`."""
