"""keyseal: signing keys that cannot be stolen.

Importing the package pulls in no cloud or HSM SDK; each backend imports its own SDK when it is opened.
"""

__version__ = "0.1.0"
