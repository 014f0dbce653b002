"""The one exception type that reaches the user as a single line.

Anything the user can fix (a bad config, a malformed data file, a missing weights file, an impossible
world size) raises `UserError`; `lora_dist.cli.main` prints it as `error: ...` and exits with status 2.
"""


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
