"""`aiproxy`: the organisers' command line for the management API (docs/api.md#management)."""
