"""keyseal: signing keys that cannot be stolen.

Importing the package pulls in no cloud or HSM SDK; each backend imports its own SDK when it is opened.
"""

from keyseal._version import __version__

__all__ = ["__version__"]
