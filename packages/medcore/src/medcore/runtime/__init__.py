"""Where a run executes: devices and the process group."""
