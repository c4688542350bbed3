"""The one exception type for mistakes a user can make (paths, formats, shapes, configs).

Scripts catch `UserError` at the boundary and print its one-sentence message without a
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one sentence naming the file/field."""


def check(condition: bool, message: str) -> None:
    """Raises `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)
