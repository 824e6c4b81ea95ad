"""The one exception type for errors a user can cause."""


class SlabError(ValueError):
    """A user-caused error: bad file, bad argument, mismatched inputs.

    The message names the file or argument and says what was expected, in one line.
    The CLI prints it as ``slab: error: <message>`` and exits with status 2.
    """
