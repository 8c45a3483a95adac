"""git-token-proxy: git clients talk plain HTTP to it; it adds a GitHub token and streams to GitHub and back."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("git-token-proxy")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
