"""The one exception type for problems a user can fix.

Library code raises ``UserError`` with a message that names the input and the fix; a command
prints that message as one ``error: ...`` line and exits 1 (``commands/cli.py``), with no
traceback. It lives apart from the command-line code so the library never imports a command.
"""


class UserError(Exception):
  """A problem the user can fix; its message is the one line the command prints."""
