"""The exception and warning types for conditions a user can cause."""


class SlabError(ValueError):
    """A user-caused error: bad file, bad argument, mismatched inputs.

    The message names the file or argument and says what was expected, in one line.
    The CLI prints it as ``slab: error: <message>`` and exits with status 2.
    """


class SlabWarning(UserWarning):
    """Something a user should know about an input that slab handled (e.g. a NIfTI whose qform
    and sform disagree). The CLI prints it as ``slab: warning: <message>``; other libraries'
    warnings are silenced there."""
