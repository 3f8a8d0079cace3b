"""Command-line tools: corpus synthesis and other utilities."""
