"""Command-line plumbing every ``<pkg>-<verb>`` shares: commands, flags, run setup, stages, launch, dry run."""
