"""Reference governor for Redis-backed trade governance, plus the designs under audit.

``governor_ref`` never imports ``chaos``: a governor under test must stand on
the wire protocol alone.
"""

__version__ = "0.1.0"
