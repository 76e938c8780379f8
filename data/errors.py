"""The one exception type of the data package."""


class DataError(ValueError):
  """Bad data input: unknown dataset, missing files, size or channel mismatch.

  Raised with a one-line message that says what is wrong and how to fix it, so that a
  misconfigured run stops at start-up with an actionable error rather than a traceback from
  deep inside a loader.
  """
