"""The one exception conversion commands raise for problems in their input."""


class ConversionError(RuntimeError):
    """A problem with the input that the user can fix (file, key, shape, config field); printed as one line."""
