"""The layer tar format, with no processes: bytes in, bytes out.

``reader`` parses a tar stream into entries, ``ustar`` builds header blocks,
``writer`` renders filesystem entries as docker does, ``header`` holds what the
two directions share (whiteout names, PAX xattr keys, times).  The process
plumbing that runs them lives in ``plugin.archive.proc``.
"""
