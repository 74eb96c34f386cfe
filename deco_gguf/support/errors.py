"""The one exception type users see: a one-line message, no traceback."""


class DecoError(Exception):
    """A problem with the user's input (file, checkpoint, option) described in one line."""
