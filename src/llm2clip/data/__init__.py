"""Data: caption sets and image-caption datasets, built-in and from files."""
