"""`aiproxy`: the organisers' command line for the management API (API.md section 3)."""
