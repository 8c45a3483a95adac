"""The benchmark suite: `python -m bench` runs every case side by side and prints one Markdown table."""
