"""git-token-proxy: git clients talk plain HTTP to it; it adds a GitHub token and streams to GitHub and back."""

# The one place the version is written (pyproject.toml reads it from here). A literal, not importlib.metadata: that
# would cost every proxy process its zipfile/email/csv imports (about 0.3 MiB) to learn a string.
__version__ = "0.1.0"
