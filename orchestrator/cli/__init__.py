"""The command line: `parser` (arguments), `commands` (what each does), `main` (the entry point)."""
