"""User-facing errors: one clear paragraph, no raw tracebacks from deep inside."""


class FastDreamError(Exception):
    """An error caused by the user's input or environment, shown without a traceback by the CLI."""


class InputError(FastDreamError, ValueError):
    """Bad arguments to an op or a function: wrong shape, dtype or range."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)
